// emu_runtime.cpp: the scheduler of the CUDA emulation (see [note: the emulated execution model]
// in cuda_runtime.h): blocks one after another, the threads of a block as fibers on the calling
// thread, barriers for __syncthreads() and the warp shuffles, deadlock detection, launch errors.
//
// The fibers switch with a few instructions of x86-64 assembly (saving the callee-saved
// registers and the stack pointer); elsewhere with ucontext. The switches are announced to
// AddressSanitizer (its fiber interface) and to ThreadSanitizer: each fiber is a TSan thread
// that synchronizes with the others only at a barrier, so TSan sees the races a missing barrier
// leaves.
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ELRA_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define ELRA_EMU_TSAN 1
#endif
// the assembly switch on x86-64, ucontext elsewhere (or with -DELRA_EMU_UCONTEXT)
#if defined(__x86_64__) && !defined(ELRA_EMU_UCONTEXT)
#define ELRA_EMU_ASM 1
#else
#include <ucontext.h>
#endif

#ifndef ELRA_EMU_STACK_BYTES
#if defined(ELRA_EMU_ASAN) || defined(ELRA_EMU_TSAN)
#define ELRA_EMU_STACK_BYTES (512 * 1024)
#else
#define ELRA_EMU_STACK_BYTES (128 * 1024)
#endif
#endif

namespace elra_emu {
namespace detail {

thread_local std::atomic<ThreadCtx*> current_thread{nullptr};
LaunchCtx launch_ctx;

struct Fiber;
}  // namespace detail
}  // namespace elra_emu

extern "C" __attribute__((visibility("hidden"), noreturn)) void elra_emu_fiber_main(
    elra_emu::detail::Fiber* f);

#if defined(ELRA_EMU_ASM)
// elra_emu_swap(save, load): pushes the callee-saved registers, stores the stack pointer in
// *save, switches to the stack `load` and pops its registers (System V ABI: rbx, rbp, r12-r15).
// A new fiber's stack holds registers with the Fiber* in rbx and returns into
// elra_emu_fiber_start, which calls elra_emu_fiber_main(rbx).
extern "C" __attribute__((visibility("hidden"))) void elra_emu_swap(void** save, void* load);
extern "C" __attribute__((visibility("hidden"))) void elra_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl elra_emu_swap
  .hidden elra_emu_swap
  .type elra_emu_swap, @function
elra_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size elra_emu_swap, .-elra_emu_swap
  .p2align 4
  .globl elra_emu_fiber_start
  .hidden elra_emu_fiber_start
  .type elra_emu_fiber_start, @function
elra_emu_fiber_start:
  movq %rbx, %rdi
  call elra_emu_fiber_main
  ud2
  .size elra_emu_fiber_start, .-elra_emu_fiber_start
)");
#endif

namespace elra_emu {
namespace detail {

struct Barrier {
  std::atomic<unsigned> count{0}, gen{0};
  unsigned expected = 0;
};

struct Warp {
  Barrier bar;
  unsigned lanes = 32;
  uint64_t slot[2][32];
};

struct Fiber {
  char* stack = nullptr;  // lowest usable address (a guard page lies below)
  size_t size = 0;
  std::atomic<bool> done{false};
  ThreadCtx ctx;
#if defined(ELRA_EMU_ASM)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
#if defined(ELRA_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
#if defined(ELRA_EMU_TSAN)
  void* tsan = nullptr;
#endif
};

namespace {

std::mutex launch_lock;
std::atomic<int> last_error{cudaSuccess};  // the first error since the last cudaGetLastError
std::atomic<int> launch_status{cudaSuccess};
const char* last_why = "";

struct Scheduler {
  std::vector<std::unique_ptr<Fiber>> fibers;  // persistent, grown on demand
  std::vector<Warp> warps;
  Barrier block_bar;
  Body body = nullptr;
  void* closure = nullptr;
  std::atomic<Fiber*> running{nullptr};
  std::atomic<unsigned long> epoch{0};  // arrivals and exits: a round without any is a deadlock
  std::atomic<bool> failed{false};
  unsigned long blocks_run = 0;
#if defined(ELRA_EMU_ASM)
  void* main_sp = nullptr;
#else
  ucontext_t main_uc;
#endif
#if defined(ELRA_EMU_ASAN)
  const void* main_bottom = nullptr;
  size_t main_size = 0;
#endif
#if defined(ELRA_EMU_TSAN)
  void* main_tsan = nullptr;
  char block_done = 0;  // the sync object of "all fibers of the block finished"
#endif
};
Scheduler S;

std::unique_ptr<Fiber> new_fiber() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = ELRA_EMU_STACK_BYTES + page;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    std::fprintf(stderr, "elra_emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  std::unique_ptr<Fiber> f(new Fiber);
  f->stack = static_cast<char*>(mem) + page;
  f->size = ELRA_EMU_STACK_BYTES;
#if defined(ELRA_EMU_TSAN)
  f->tsan = __tsan_create_fiber(0);
#endif
  return f;
}

#if !defined(ELRA_EMU_ASM)
void uc_entry() { elra_emu_fiber_main(S.running.load()); }
#endif

// A fresh start of fiber f (its old stack contents, if any, are dropped).
void reset(Fiber* f) {
  f->done.store(false, std::memory_order_relaxed);
  f->ctx.shfl_parity = 0;
#if defined(ELRA_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(f->stack, f->size);
  f->fake_stack = nullptr;
#endif
#if defined(ELRA_EMU_ASM)
  // elra_emu_swap pops r15 r14 r13 r12 rbx rbp and returns; elra_emu_fiber_start then calls
  // with rsp 16-byte aligned (the ABI's rule at a call)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 72);
  for (int i = 0; i < 9; ++i) sp[i] = nullptr;
  sp[4] = f;                                                   // rbx
  sp[6] = reinterpret_cast<void*>(&elra_emu_fiber_start);      // return address
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = f->size;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, &uc_entry, 0);
#endif
}

// main -> fiber f, back when f yields or finishes.
void resume(Fiber* f) {
  S.running.store(f, std::memory_order_relaxed);
  current_thread.store(&f->ctx, std::memory_order_relaxed);
#if defined(ELRA_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, f->size);
#endif
#if defined(ELRA_EMU_TSAN)
  __tsan_switch_to_fiber(f->tsan, 0);  // the fiber sees what the host did before the launch
#endif
#if defined(ELRA_EMU_ASM)
  elra_emu_swap(&S.main_sp, f->sp);
#else
  swapcontext(&S.main_uc, &f->uc);
#endif
#if defined(ELRA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// fiber -> main; `exiting`: the fiber never resumes.
void to_main(Fiber* f, bool exiting) {
#if defined(ELRA_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, S.main_bottom, S.main_size);
#endif
#if defined(ELRA_EMU_TSAN)
  __tsan_switch_to_fiber(S.main_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(ELRA_EMU_ASM)
  elra_emu_swap(&f->sp, S.main_sp);
#else
  swapcontext(&f->uc, &S.main_uc);
#endif
#if defined(ELRA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

void yield() { to_main(S.running.load(std::memory_order_relaxed), false); }

void arrive_and_wait(Barrier& b) {
  const unsigned gen = b.gen.load(std::memory_order_relaxed);
#if defined(ELRA_EMU_TSAN)
  __tsan_release(&b);
#endif
  S.epoch.fetch_add(1, std::memory_order_relaxed);
  if (b.count.fetch_add(1, std::memory_order_relaxed) + 1 == b.expected) {
    b.count.store(0, std::memory_order_relaxed);
    b.gen.fetch_add(1, std::memory_order_relaxed);
  } else {
    while (b.gen.load(std::memory_order_relaxed) == gen &&
           !S.failed.load(std::memory_order_relaxed))
      yield();
  }
#if defined(ELRA_EMU_TSAN)
  __tsan_acquire(&b);
#endif
}

void record(cudaError_t e, const char* why) {
  int ok = cudaSuccess;
  launch_status.compare_exchange_strong(ok, e);
  ok = cudaSuccess;
  if (last_error.compare_exchange_strong(ok, e)) last_why = why;
}

void run_block(unsigned nthreads, dim3 block) {
  S.block_bar.count = 0;
  S.block_bar.expected = nthreads;
  for (size_t w = 0; w < S.warps.size(); ++w) {
    S.warps[w].bar.count = 0;
    S.warps[w].lanes = std::min<unsigned>(32u, nthreads - 32u * static_cast<unsigned>(w));
    S.warps[w].bar.expected = S.warps[w].lanes;
  }
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber* f = S.fibers[t].get();
    reset(f);
    f->ctx.thread_idx.x = t % block.x;
    f->ctx.thread_idx.y = (t / block.x) % block.y;
    f->ctx.thread_idx.z = t / (block.x * block.y);
  }
  unsigned alive = nthreads;
  // [note: schedule] Warp by warp: each warp runs (its lanes round-robin, every other round
  // backwards) until all of its threads wait at __syncthreads() or have finished, then the next
  // warp; blocks alternate between warps in increasing and in decreasing order. Warps thus
  // reach a barrier at very different times, so that a result which depends on the order of
  // the warps between two barriers (a race, a missing __syncthreads()) comes out wrong in one
  // of the two orders instead of matching by luck.
  const bool up = (S.blocks_run++ & 1u) == 0;
  const unsigned nwarps = static_cast<unsigned>(S.warps.size());
  while (alive > 0) {
    const unsigned long before = S.epoch.load(std::memory_order_relaxed);
    for (unsigned wi = 0; wi < nwarps; ++wi) {
      const unsigned w = up ? wi : nwarps - 1 - wi, first = 32u * w;
      const unsigned lanes = S.warps[w].lanes;
      for (unsigned round = 0;; ++round) {
        const unsigned long warp_before = S.epoch.load(std::memory_order_relaxed);
        for (unsigned i = 0; i < lanes; ++i) {
          Fiber* f = S.fibers[first + ((round & 1u) ? lanes - 1 - i : i)].get();
          if (f->done.load(std::memory_order_relaxed)) continue;
          resume(f);
          if (f->done.load(std::memory_order_relaxed)) --alive;
        }
        if (S.epoch.load(std::memory_order_relaxed) == warp_before) break;  // waits or done
      }
    }
    if (alive > 0 && S.epoch.load(std::memory_order_relaxed) == before) {
      // A deadlock: the launch fails. From now on the barriers do not wait, so the next pass
      // runs the waiting threads to their end (the block's results are garbage, as after any
      // failed launch) and nothing is left half-way for the next launch.
      S.failed = true;
      record(cudaErrorLaunchFailure,
             "deadlock: some threads wait at a barrier that others never reach");
    }
  }
#if defined(ELRA_EMU_TSAN)
  __tsan_acquire(&S.block_done);
#endif
}

}  // namespace

void sync_block() { arrive_and_wait(S.block_bar); }

uint64_t warp_exchange(unsigned mask, uint64_t bits, int src, bool in_range) {
  ThreadCtx* t = thread_ctx();
  const unsigned tid = t->thread_idx.x + launch_ctx.block_dim.x *
                                             (t->thread_idx.y + launch_ctx.block_dim.y *
                                                                    t->thread_idx.z);
  Warp& w = S.warps[tid / 32u];
  const unsigned lane = tid % 32u;
  const unsigned full = w.lanes == 32u ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if ((mask & full) != full) fail(cudaErrorLaunchFailure, "shuffle with a partial lane mask");
  const unsigned p = t->shfl_parity;
  t->shfl_parity ^= 1u;
  w.slot[p][lane] = bits;
  arrive_and_wait(w.bar);
  if (!in_range || src < 0 || static_cast<unsigned>(src) >= w.lanes) return bits;
  return w.slot[p][src];
}

void fail(cudaError_t e, const char* why) {
  S.failed = true;
  record(e, why);
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, Body body, void* closure) {
  std::lock_guard<std::mutex> lock(launch_lock);
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  if (nthreads == 0 || nthreads > 1024 || nblocks == 0 || grid.y > 65535 || grid.z > 65535 ||
      smem > 48 * 1024) {
    record(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return cudaErrorInvalidConfiguration;
  }
  while (S.fibers.size() < nthreads) S.fibers.push_back(new_fiber());
  S.warps = std::vector<Warp>((nthreads + 31) / 32);
#if defined(ELRA_EMU_TSAN)
  if (!S.main_tsan) S.main_tsan = __tsan_get_current_fiber();
#endif
  S.body = body;
  S.closure = closure;
  S.failed = false;
  launch_status = cudaSuccess;
  launch_ctx.grid_dim = grid;
  launch_ctx.block_dim = block;
  for (unsigned z = 0; z < grid.z && !S.failed; ++z)
    for (unsigned y = 0; y < grid.y && !S.failed; ++y)
      for (unsigned x = 0; x < grid.x && !S.failed; ++x) {
        launch_ctx.block_idx.x = x;
        launch_ctx.block_idx.y = y;
        launch_ctx.block_idx.z = z;
        run_block(static_cast<unsigned>(nthreads), block);
      }
  return static_cast<cudaError_t>(launch_status.load());
}

}  // namespace detail

cudaError_t cudaGetLastError() {
  const int e = detail::last_error.exchange(cudaSuccess);
  return static_cast<cudaError_t>(e);
}
cudaError_t cudaPeekAtLastError() { return static_cast<cudaError_t>(detail::last_error.load()); }
cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure:
    case cudaErrorMisalignedAddress: return detail::last_why;
  }
  return "unknown error";
}

}  // namespace elra_emu

using elra_emu::detail::Fiber;
using elra_emu::detail::S;

extern "C" void elra_emu_fiber_main(Fiber* f) {
#if defined(ELRA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &S.main_bottom, &S.main_size);
#endif
  S.body(S.closure);
  S.epoch.fetch_add(1, std::memory_order_relaxed);
  f->done.store(true, std::memory_order_relaxed);
#if defined(ELRA_EMU_TSAN)
  __tsan_release(&S.block_done);
#endif
  elra_emu::detail::to_main(f, true);
  __builtin_unreachable();
}
