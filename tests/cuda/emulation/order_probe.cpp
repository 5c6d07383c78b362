// The witness of the emulation's block order (tests/cuda/test_emulated_block_order.py): `visited[i]` gets the
// index of the block that a launch of `blocks` one-thread blocks runs i-th. Linked into the emulated module
// beside csrc/ and called through ctypes, so it runs the same `lpa_emu::launch` as every kernel.
extern "C" void lpa_emu_visit_order(unsigned blocks, unsigned* visited) {
  unsigned next = 0;
  lpa_emu::launch(dim3(blocks), dim3(1), [&] { visited[next++] = blockIdx.x; });
}
