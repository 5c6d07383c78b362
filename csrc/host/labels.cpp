// label_range: one pass for the smallest and largest label (the host-side check of CPU labels, where
// torch.aminmax + a read-back cost several PyTorch dispatches).
#include <algorithm>

#include "host_kernels.h"

namespace lpa_host {

template <typename Label> void label_range(const Label* labels, int64_t B, int64_t* lo, int64_t* hi) {
  Label low = labels[0], high = labels[0];
  for (int64_t i = 1; i < B; ++i) {
    low = std::min(low, labels[i]);
    high = std::max(high, labels[i]);
  }
  *lo = low;
  *hi = high;
}

template void label_range<int32_t>(const int32_t*, int64_t, int64_t*, int64_t*);
template void label_range<int64_t>(const int64_t*, int64_t, int64_t*, int64_t*);

}  // namespace lpa_host
