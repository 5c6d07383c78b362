"""Checkpoints of ``lpa-train`` runs: ``--save-dir DIR --save-every N`` and ``--resume DIR|FILE``.

A run (one method and seed) writes ``DIR/<method>-seed<seed>/epoch-NNNN.pt`` after every N-th epoch and
after the last, keeps the newest ``--keep-last`` of them, and writes each through a temporary file in
the same folder and a rename, so a job killed while saving leaves the previous checkpoints intact. One
file holds everything the rest of the run depends on (``torch.load(path, weights_only=True)`` reads it):

    format, run ({method, seed}), epoch (epochs completed), world_size, args (every lpa-train option),
    config (the options that shape training), lpa_config (the method's LPAConfig as a dict), model (full state dict, also under FSDP2), method (``method.state_dict()``:
    delta, policy state incl. loss_trend's running state, counters), optimizer (full, keyed by parameter
    name), scheduler, sampler ({seed, epoch}: the next epoch's order), rng (each rank's torch generator
    states; the next epoch reseeds them anyway), progress (what the report needs from the epochs done,
    e.g. the step times)

``--resume FILE`` continues the run that wrote FILE; ``--resume DIR`` continues every requested run
from its newest checkpoint under DIR (a run without one starts from scratch; a DIR with none for any of
them is refused). A run's folder under ``--save-dir`` may hold checkpoints only when the run resumes
from one of them: a fresh run there would overwrite another run's checkpoints. Checkpoints are ordered
by their epoch number, not their name (``epoch-10000.pt`` is newer than ``epoch-9999.pt``). The options that shape
training must equal the checkpoint's (those both versions of lpa-train have, except options the run's
method reads under neither setting, e.g. ``--lpl-eps`` of an lpa run); the process count, device,
backend, FSDP and output options may differ: the global batches do not depend on the number of
processes, and the model, optimizer and method state are saved whole. Rank 0 reads the file and sends
it to the other ranks, so the ranks need not share a file system.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lpa_kernels.lpa import METHODS, LPAConfig
from lpa_kernels.lpa.policies import head_count
from lpa_programs.cli import check_writable, number, write_atomically
from lpa_programs.data import DATASETS, NUM_CLASSES, resolved_imbalance
from lpa_programs.distributed import Context, sync_buffers

FORMAT = "lpa-train checkpoint 1"
# options that may differ between the run that wrote a checkpoint and the run that resumes it
FREE_OPTIONS = ("method", "seeds", "device", "threads", "backend", "data_dir", "shot_rule", "json", "plot",
                "quiet", "save_dir", "save_every", "keep_last", "resume", "fsdp", "dist_timeout", "order_guard",
                "eval_every", "recipe")
_LPA_OPTIONS = frozenset(f.name for f in dataclasses.fields(LPAConfig))  # the training options LPAConfig holds
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.pt")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written where ``--save-dir`` says (what ``check_arguments`` could not
    foresee: a full disk, a file system that refuses the folder)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-dir", default=None, metavar="DIR",
                        help="write checkpoints to DIR/<method>-seed<seed>/epoch-NNNN.pt (with --save-every)")
    parser.add_argument("--save-every", type=number(int, 1), default=None, metavar="N",
                        help="checkpoint every N epochs and after the last")
    parser.add_argument("--keep-last", type=number(int, 1), default=2, metavar="K", help="checkpoints kept per run")
    parser.add_argument("--resume", default=None, metavar="DIR|FILE",
                        help="continue from a checkpoint file, or each run from its newest checkpoint in DIR")


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def training_config(args: argparse.Namespace) -> dict:
    """The options that shape a run's training: they must match on resume."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in FREE_OPTIONS}


def as_trained(config: dict, method: str) -> dict:
    """``config`` (``training_config``'s) as the method ``method`` trains with it: the defaults lpa-train
    resolves filled in (the dataset's imbalance, ``LPAConfig``'s step sizes and ``init``), the method's
    fixed settings applied (``loss="la"`` for the la methods) and ``head_classes`` / ``head_fraction`` as
    the number of head classes they give on the dataset, so that an option given as the value it
    resolves to compares equal to the option left out."""
    config = dict(config)
    if config.get("dataset") in DATASETS:  # (a dataset of another version of lpa-train: compared as given)
        config["imbalance"] = resolved_imbalance(config["dataset"], config.get("imbalance"))
    lpa_config = _lpa_config(config)
    if lpa_config is None or method not in METHODS:  # options of another version of lpa-train: compared as given
        return config
    resolved = lpa_config.for_method(method).resolved()
    config.update({name: resolved[name] for name in _LPA_OPTIONS & set(config)})
    base = str(config.get("dataset")).removesuffix("-lt")
    if {"head_classes", "head_fraction"} <= set(config) and base in NUM_CLASSES:
        config.update(head_classes=head_count(lpa_config, NUM_CLASSES[base]), head_fraction=None)
    return config


def unread_options(config: dict, method: str) -> set[str]:
    """The options in ``config`` (``training_config``'s) that the method ``method`` does not read: the
    ``LPAConfig`` options outside ``LPAConfig.settings_for`` (e.g. ``--lpl-eps`` for ``lpa``, every LPA option
    for ``erm``), and ``--layer`` for a method without settings (``erm``, ``la``: the model is split there but
    nothing is done to the layer's output); none when ``config`` does not make an ``LPAConfig`` (options of
    another version of lpa-train: all compared)."""
    lpa_config = _lpa_config(config)
    if lpa_config is None or method not in METHODS:
        return set()
    unread = set(config) & _LPA_OPTIONS - set(lpa_config.settings_for(method))
    if not METHODS[method].meta.get("settings") and "layer" in config:
        unread.add("layer")
    return unread


def _lpa_config(config: dict) -> LPAConfig | None:
    """The ``LPAConfig`` that ``config``'s ``LPAConfig`` options make, or None when they make none."""
    try:
        return LPAConfig(**{name: config[name] for name in _LPA_OPTIONS & set(config)})
    except (TypeError, ValueError):
        return None


def read(path: Path) -> dict:
    """The checkpoint in ``path``; ``ValueError`` if it is not one (``OSError`` if it cannot be read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch raises many kinds for a file it cannot parse (KeyError for text)
        raise ValueError(f"{path} is not a file torch.save wrote ({type(exc).__name__})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lpa-train checkpoint")
    return checkpoint


def saved_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints ``epoch-NNNN.pt`` in ``folder``, oldest first (by epoch number: as strings,
    ``epoch-10000.pt`` would sort before ``epoch-9999.pt``)."""
    numbered = []
    for path in folder.glob("epoch-*.pt"):
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    return [path for _, path in sorted(numbered)]


def resume_file(resume: str | None, method: str, seed: int) -> Path | None:
    """The checkpoint ``--resume`` names for the run ``(method, seed)``, if any."""
    if resume is None:
        return None
    path = Path(resume).expanduser()
    if path.is_file():
        run = read(path)["run"]
        return path if (run["method"], run["seed"]) == (method, seed) else None
    found = saved_checkpoints(path / run_name(method, seed))
    return found[-1] if found else None


def check_arguments(args: argparse.Namespace) -> str:
    """Why the checkpoint options cannot be used ("" when they can); reads every checkpoint to resume,
    compares its training options with this command's, and refuses a run folder under ``--save-dir`` that
    holds checkpoints the run does not continue."""
    if args.save_every is not None and args.save_dir is None:
        return "argument --save-every: needs --save-dir"
    runs = [(m, s) for m in args.method for s in args.seeds]
    if args.save_dir is not None:
        if args.save_every is None:
            return "argument --save-dir: needs --save-every N"
        for method, seed in runs:  # each run's own folder, which may be taken by a file
            problem = check_writable(Path(args.save_dir) / run_name(method, seed) / "epoch-0001.pt")
            if problem:
                return f"argument --save-dir: {problem}"
    resumed = {}  # run -> the checkpoint it continues
    if args.resume is not None:
        path = Path(args.resume).expanduser()
        if not path.exists():
            return f"argument --resume: no such file or folder: {args.resume}"
        try:
            if path.is_file():
                run = read(path)["run"]
                if (run["method"], run["seed"]) not in runs:
                    return f"argument --resume: {path} belongs to run {run}, not one of this command's"
            for method, seed in runs:
                found = resume_file(args.resume, method, seed)
                if found is not None:
                    resumed[method, seed] = found
            if not resumed:  # a folder (a file names one of the runs: checked above)
                looked = ", ".join(str(path / run_name(m, s) / "epoch-NNNN.pt") for m, s in runs)
                hint = ("; it holds checkpoints itself: give the folder above it, or one checkpoint file"
                        if saved_checkpoints(path) else "")
                return f"argument --resume: no checkpoint of this command's runs in {path} (looked for {looked}){hint}"
            for (method, seed), found in resumed.items():
                problem = _mismatch(read(found)["config"], training_config(args), method)
                if problem:
                    return f"argument --resume: {found} was written with {problem} (the options that shape training must match)"
        except (OSError, ValueError, KeyError) as exc:
            return f"argument --resume: cannot read a checkpoint: {exc}"
    if args.save_dir is not None:
        for method, seed in runs:
            folder = Path(args.save_dir) / run_name(method, seed)
            continued = resumed.get((method, seed))
            if saved_checkpoints(folder) and (continued is None or continued.parent.resolve() != folder.resolve()):
                return (f"argument --save-dir: {folder} holds checkpoints of an earlier run, which this run would "
                        f"overwrite: continue that run with --resume {args.save_dir}, or give another --save-dir")
    return ""


def _mismatch(given_saved: dict, given_mine: dict, method: str) -> str:
    """The first option that shapes ``method``'s training and differs between a checkpoint's
    ``training_config`` and this command's, as "--OPTION SAVED, this command has MINE"; "" when none does."""
    saved, mine = as_trained(given_saved, method), as_trained(given_mine, method)
    # an option one of the two versions of lpa-train lacks is not compared, nor one that the run's
    # method reads under neither of the two settings (e.g. --lpl-eps of an lpa run)
    unread = unread_options(given_saved, method) & unread_options(given_mine, method)
    differ = [k for k in sorted(set(saved) & set(mine) - unread) if saved[k] != mine[k]]
    if not differ:
        return ""
    # an option given differently before one that differs only as resolved from it (a step size
    # resolved from the radius policy)
    k = next((k for k in differ if given_saved.get(k) != given_mine.get(k)), differ[0])
    return f"--{k.replace('_', '-')} {saved.get(k)}, this command has {mine.get(k)}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    """Saves and restores one run's state (see the module docstring). Every rank calls every method:
    gathering a sharded model or optimizer state is collective."""

    def __init__(self, args: argparse.Namespace, ctx: Context, method_name: str, seed: int, model, method,
                 optimizer, scheduler):
        self.args, self.ctx, self.run = args, ctx, {"method": method_name, "seed": seed}
        self.model, self.method, self.optimizer, self.scheduler = model, method, optimizer, scheduler
        self.folder = None if args.save_dir is None else Path(args.save_dir) / run_name(method_name, seed)

    def restore(self) -> tuple[int, dict]:
        """Load ``--resume``'s checkpoint of this run, if any: ``(epochs completed, progress)`` (the
        ``progress`` given to ``after_epoch``; ``(0, {})`` without a checkpoint)."""
        checkpoint = None
        if self.ctx.is_main:
            found = resume_file(self.args.resume, self.run["method"], self.run["seed"])
            checkpoint = None if found is None else read(found)
        if self.ctx.world > 1:
            box = [checkpoint]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
        if checkpoint is None:
            return 0, {}
        set_model_state_dict(self.model, checkpoint["model"], options=StateDictOptions(full_state_dict=True))
        self.method.load_state_dict(checkpoint["method"])
        set_optimizer_state_dict(self.model, self.optimizer, checkpoint["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if len(checkpoint["rng"]) == self.ctx.world:  # the same ranks: each takes its own generator back
            rng = checkpoint["rng"][self.ctx.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return checkpoint["epoch"], checkpoint["progress"]

    def after_epoch(self, epoch: int, progress: dict) -> None:
        """At the end of every epoch: rank 0's buffers to every rank (``sync_buffers``), and a checkpoint
        after ``epoch`` completed epochs when ``--save-every`` says so, or after the last. ``progress``:
        lists and numbers the run's report needs from the epochs so far (saved as they are)."""
        sync_buffers(self.model)
        if self.folder is None or not (epoch % self.args.save_every == 0 or epoch == self.args.epochs):
            return
        model = get_model_state_dict(self.model, options=_FULL)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        rng = [_rng_state()]
        if self.ctx.world > 1:
            rng = [None] * self.ctx.world
            dist.all_gather_object(rng, _rng_state())
        if not self.ctx.is_main:
            return
        checkpoint = {
            "format": FORMAT, "run": self.run, "epoch": epoch, "world_size": self.ctx.world,
            "args": vars(self.args), "config": training_config(self.args),
            "lpa_config": dataclasses.asdict(self.method.config), "model": model,
            "method": {k: v.cpu() for k, v in self.method.state_dict().items()}, "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(), "sampler": {"seed": self.run["seed"], "epoch": epoch},
            "rng": rng, "progress": progress,
        }
        try:
            write_atomically(self.folder / f"epoch-{epoch:04d}.pt", lambda f: torch.save(checkpoint, f))
            for old in saved_checkpoints(self.folder)[:-self.args.keep_last]:
                old.unlink()
        except OSError as exc:
            raise CheckpointWriteError(f"argument --save-dir: cannot write a checkpoint in {self.folder}: "
                                       f"{exc.strerror or exc}") from exc
