"""A caching allocator for large CPU tensors (``train.cpu_allocator="caching"``).

Why: on CPU a training step allocates and frees the same large activations (a few to a few tens of
MB each) step after step. glibc keeps freed blocks of that size in its heap, whose holes it cannot
hand back, so the process's peak RSS ends up 0.5-0.7 GB above the bytes actually live; making glibc
``mmap`` them instead (``train.cpu_mmap_threshold``) hands the pages back but has the kernel map and
zero them again on every allocation, +20-30 % step time (``benchmarks/msda_steps.md``).

What this does instead, the way GPU frameworks manage device memory: every block of at least
``min_block`` bytes is its own anonymous ``mmap``; on free it is kept in a cache and handed to the
next request it fits (best fit, at most ``max_waste`` larger than asked), so the next step's
activations reuse this step's pages without faulting or zeroing them again. The cache is bounded
by the live bytes: when nothing cached fits a request, cached blocks are unmapped (least recently
freed first) until the bytes mapped, live + cached, stay within ``1 + slack`` times the most bytes
ever live at once. So the peak RSS follows the live bytes, a change of tensor sizes (multi-scale
training) cannot pile up blocks of old sizes, and pages are zeroed by the kernel only for what the
cache could not serve. Smaller blocks go to ``c10::alloc_cpu``, as with torch's default allocator.

It is installed with ``c10::SetCPUAllocator``: tensors allocated before keep their own deleter, so
switching on (and off) in the middle of a process is safe. The allocator reports to torch's
profiler like the default one. It is compiled on first use with
:func:`torch.utils.cpp_extension.load_inline` (a C++ compiler and ``ninja``, about 30 s once, then
cached); without a compiler :func:`enable` logs one line and returns False.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

__all__ = ["enable", "disable", "stats", "apply_config", "CPU_ALLOCATOR_CHOICES"]

logger = logging.getLogger(__name__)

CPU_ALLOCATOR_CHOICES = ("auto", "caching", "default")

_SOURCE = r"""
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

struct Block {
  size_t size;
  bool cached;
  std::list<void*>::iterator lru;            // position in the free list while cached
  std::multimap<size_t, void*>::iterator by_size;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  size_t min_block = 1 << 20;
  double max_waste = 0.25;                   // a cached block serves requests down to size/(1+max_waste)
  double slack = 0.25;                       // bytes mapped <= (1 + slack) * most bytes live at once

  c10::DataPtr allocate(size_t n) override {
    void* p = n >= min_block ? allocate_large(n) : (n == 0 ? nullptr : c10::alloc_cpu(n));
    if (p != nullptr && c10::memoryProfilingEnabled()) {
      std::lock_guard<std::mutex> g(mu_);
      live_ += n;
      c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(n), live_, mapped_, c10::Device(c10::DeviceType::CPU));
      reported_[p] = n;
    }
    return {p, p, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void deleter(void* p);

  void release(void* p) {
    if (p == nullptr) return;
    std::unique_lock<std::mutex> g(mu_);
    auto rep = reported_.find(p);
    if (rep != reported_.end()) {
      live_ -= rep->second;
      c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(rep->second), live_, mapped_, c10::Device(c10::DeviceType::CPU));
      reported_.erase(rep);
    }
    auto it = blocks_.find(p);
    if (it == blocks_.end()) {
      g.unlock();
      c10::free_cpu(p);
      return;
    }
    Block& b = it->second;
    live_blocks_ -= b.size;
    b.cached = true;
    b.lru = lru_.insert(lru_.end(), p);
    b.by_size = free_.emplace(b.size, p);
    cached_ += b.size;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> g(mu_);
    while (!lru_.empty()) unmap_locked(lru_.front());
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(mapped_), static_cast<int64_t>(cached_), static_cast<int64_t>(peak_mapped_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_), static_cast<int64_t>(blocks_.size()),
            static_cast<int64_t>(live_blocks_), static_cast<int64_t>(max_live_)};
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  void reset_peak() {
    std::lock_guard<std::mutex> g(mu_);
    peak_mapped_ = mapped_;
  }

 private:
  void* allocate_large(size_t n) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t size = (n + page - 1) / page * page;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && static_cast<double>(it->first) <= static_cast<double>(size) * (1.0 + max_waste)) {
        void* p = it->second;
        Block& b = blocks_.at(p);
        free_.erase(it);
        lru_.erase(b.lru);
        b.cached = false;
        cached_ -= b.size;
        note_live_locked(b.size);
        ++hits_;
        return p;
      }
      ++misses_;
      // Nothing cached fits. The bytes mapped (live + cached) may reach (1 + slack) times the most
      // bytes ever live at once: hand back cached blocks, least recently freed first, until the new
      // block fits under that, so a change of tensor sizes (multi-scale training) cannot pile up
      // blocks of the old sizes.
      const size_t budget = static_cast<size_t>(static_cast<double>(std::max(max_live_, live_blocks_ + size)) * (1.0 + slack));
      while (mapped_ + size > budget && !lru_.empty()) unmap_locked(lru_.front());
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      // Out of address space or memory: give the cache back and try once more.
      empty_cache();
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "CPU caching allocator: out of memory allocating ", n, " bytes");
    }
    std::lock_guard<std::mutex> g(mu_);
    Block b;
    b.size = size;
    b.cached = false;
    blocks_.emplace(p, b);
    mapped_ += size;
    if (mapped_ > peak_mapped_) peak_mapped_ = mapped_;
    note_live_locked(size);
    return p;
  }

  void note_live_locked(size_t size) {
    live_blocks_ += size;
    if (live_blocks_ > max_live_) max_live_ = live_blocks_;
  }

  void unmap_locked(void* p) {
    auto it = blocks_.find(p);
    Block& b = it->second;
    lru_.erase(b.lru);
    free_.erase(b.by_size);
    cached_ -= b.size;
    mapped_ -= b.size;
    munmap(p, b.size);
    blocks_.erase(it);
  }

  std::mutex mu_;
  std::unordered_map<void*, Block> blocks_;  // every mapped block, live or cached
  std::multimap<size_t, void*> free_;        // cached blocks by size
  std::list<void*> lru_;                     // cached blocks, least recently freed first
  std::unordered_map<void*, size_t> reported_;
  size_t mapped_ = 0, cached_ = 0, peak_mapped_ = 0, live_ = 0;
  size_t live_blocks_ = 0, max_live_ = 0;  // bytes of the mapped blocks in use: now, and the most so far
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive the module's globals at interpreter exit.
CachingCPUAllocator* const g_alloc = new CachingCPUAllocator();
c10::Allocator* g_previous = nullptr;

void CachingCPUAllocator::deleter(void* p) { g_alloc->release(p); }

// A fork (a DataLoader worker) while another thread holds the allocator's lock would leave the
// child's copy locked: hold the lock across fork, as glibc does for malloc.
void register_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_alloc->lock(); }, [] { g_alloc->unlock(); }, [] { g_alloc->unlock(); });
  });
}

void enable(int64_t min_block, double max_waste, double slack) {
  register_fork_handlers();
  g_alloc->min_block = static_cast<size_t>(min_block);
  g_alloc->max_waste = max_waste;
  g_alloc->slack = slack;
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != g_alloc) {
    g_previous = current;
    c10::SetCPUAllocator(g_alloc, /*priority=*/UINT8_MAX);
  }
}

bool disable() {
  if (c10::GetCPUAllocator() != g_alloc || g_previous == nullptr) return false;
  c10::SetCPUAllocator(g_previous, /*priority=*/UINT8_MAX);
  g_alloc->empty_cache();
  return true;
}

bool active() { return c10::GetCPUAllocator() == g_alloc; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("enable", &enable);
  m.def("disable", &disable);
  m.def("active", &active);
  m.def("empty_cache", [] { g_alloc->empty_cache(); });
  m.def("reset_peak", [] { g_alloc->reset_peak(); });
  m.def("stats", [] { return g_alloc->stats(); });
}
"""

_LOCK = threading.Lock()
_EXTENSION = None
_BUILD_FAILED: Optional[str] = None


def _load():
    global _EXTENSION, _BUILD_FAILED
    with _LOCK:
        if _EXTENSION is None and _BUILD_FAILED is None:
            try:
                from torch.utils import cpp_extension

                logger.info("Compiling the CPU caching allocator (once; then cached in $TORCH_EXTENSIONS_DIR "
                            "or ~/.cache/torch_extensions)")
                _EXTENSION = cpp_extension.load_inline(
                    name="tprd_cpu_caching_allocator", cpp_sources=[_SOURCE], extra_cflags=["-O2"],
                    verbose=False)
            except Exception as exc:  # noqa: BLE001 -- any build failure means: keep torch's allocator
                _BUILD_FAILED = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return _EXTENSION


def enable(min_block: int = 1 << 20, max_waste: float = 0.25, slack: float = 0.25) -> bool:
    """Make the caching allocator torch's CPU allocator for this process; True when it is active.

    ``min_block``: blocks of at least this many bytes are mapped and cached (smaller ones go to
    ``c10::alloc_cpu``); ``max_waste``: a cached block serves a request at most this fraction
    smaller than itself; ``slack``: the bytes mapped (live + cached) stay within ``1 + slack`` times
    the most bytes ever live at once. Calling it again updates the settings. Returns False (one log
    line) when the extension cannot be built or on a platform without ``mmap``.
    """
    if isinstance(min_block, bool) or not isinstance(min_block, int) or min_block < 4096:
        raise ValueError(f"min_block={min_block!r}: expected an integer number of bytes >= 4096")
    for name, value in (("max_waste", max_waste), ("slack", slack)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 4.0:
            raise ValueError(f"{name}={value!r}: expected a fraction from 0 to 4")
    import sys

    if sys.platform == "win32":
        logger.info("The CPU caching allocator needs mmap; torch's default CPU allocator is kept.")
        return False
    ext = _load()
    if ext is None:
        logger.warning(f"The CPU caching allocator could not be built ({_BUILD_FAILED}); "
                       "torch's default CPU allocator is kept.")
        return False
    ext.enable(int(min_block), float(max_waste), float(slack))
    return True


def disable() -> bool:
    """Give torch its previous CPU allocator back and unmap the cache; False when it was not active."""
    return bool(_EXTENSION is not None and _EXTENSION.disable())


def stats() -> dict:
    """Of the large blocks: bytes mapped (live + cached), cached, the most ever mapped, cache hits and
    misses, blocks mapped, bytes live now and the most live at once; empty before the first enable."""
    if _EXTENSION is None:
        return {}
    mapped, cached, peak, hits, misses, blocks, live, max_live = _EXTENSION.stats()
    return {"mapped": mapped, "cached": cached, "peak_mapped": peak, "hits": hits, "misses": misses,
            "blocks": blocks, "live": live, "max_live": max_live, "active": bool(_EXTENSION.active())}


def apply_config(choice, device: str) -> bool:
    """``train.cpu_allocator``: ``"auto"`` (the default) installs the caching allocator when the run
    trains on the CPU (``train.device`` is ``cpu``), ``"caching"`` always, ``"default"`` never (torch's
    own CPU allocator). Returns True when the caching allocator is active afterwards."""
    if choice not in CPU_ALLOCATOR_CHOICES:
        raise ValueError(f"train.cpu_allocator={choice!r}: expected one of {', '.join(map(repr, CPU_ALLOCATOR_CHOICES))} "
                         "(\"auto\": the caching allocator when train.device=cpu)")
    if choice == "default" or (choice == "auto" and str(device).split(":")[0] != "cpu"):
        return False
    return enable()
