// The emulator's scheduler (see cuda_emulation.h): blocks one after another, a block's threads as
// ucontext fibers on this OS thread, switched only where a thread must wait for others.
#include <cxxabi.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_emulation.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace cuda_emulation {

bool force_int64_index = false;

namespace {

// The limits of the emulated device: an sm_90 GPU (H100 / H200).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultDynamicSharedBytes = 48 * 1024;
constexpr int kMaxDynamicSharedBytesOptin = 227 * 1024;
constexpr int kWarpSize = 32;
// Each thread's fiber stack, with a guard page below it (an overflow faults, never corrupts).
constexpr size_t kStackBytes = 64 * 1024;

struct Stack {
  void* base;  // the usable part, above the guard page
};

std::vector<Stack>& stack_pool() {
  static std::vector<Stack> stacks;
  return stacks;
}

void reserve_stacks(size_t count) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (stack_pool().size() < count) {
    void* region = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || mprotect(region, page, PROT_NONE) != 0) {
      std::perror("cuda_emulation: fiber stack");
      std::abort();
    }
    stack_pool().push_back({static_cast<char*>(region) + page});
  }
}

enum class State { kReady, kWaiting, kExited };

struct Fiber {
  ucontext_t context;
  uint3 index;
  State state;
};

// Threads (by index in the block) that wait until `expected` of them have arrived.
struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned mask = 0;  // warp barriers: the lanes taking part
  std::vector<int> waiters;
};

struct Warp {
  Barrier barrier;
  unsigned char slot[kWarpSize][8];  // each lane's shuffle operand
};

// The block being run.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier syncthreads;
  int current = 0;
  int exited = 0;
  ucontext_t scheduler;
  std::string fault;  // non-empty: the block stopped with this error
};

Block* running = nullptr;
const std::function<void()>* running_body = nullptr;

alignas(kDynamicSharedAlignment) unsigned char dynamic_shared[kMaxDynamicSharedBytesOptin];

std::mutex launch_mutex;
cudaError_t last_error = cudaSuccess;
std::string last_fault_message;
std::vector<std::string> launch_log;
uint64_t schedule_seed = 0;
std::map<const void*, int> max_dynamic_shared;  // per kernel, set by cudaFuncSetAttribute

std::string describe(const uint3& t) {
  return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," +
         std::to_string(t.z) + ") of block (" + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler; returns when this thread is resumed.
void yield_to_scheduler() {
  Fiber& self = running->fibers[running->current];
  swapcontext(&self.context, &running->scheduler);
}

// Stops the block: the faulting thread never resumes.
[[noreturn]] void fault(const std::string& message) {
  running->fault = message;
  running->fibers[running->current].state = State::kWaiting;
  yield_to_scheduler();
  std::abort();  // unreachable: a faulted block is abandoned
}

void arrive_and_wait(Barrier& barrier) {
  if (++barrier.arrived == barrier.expected) {
    for (int waiter : barrier.waiters) running->fibers[waiter].state = State::kReady;
    barrier.waiters.clear();
    barrier.arrived = 0;
    barrier.mask = 0;
    return;
  }
  barrier.waiters.push_back(running->current);
  running->fibers[running->current].state = State::kWaiting;
  yield_to_scheduler();
}

void fiber_main() {
  (*running_body)();
  running->fibers[running->current].state = State::kExited;
  ++running->exited;
  yield_to_scheduler();
}

const Fiber& first_exited(const Block& block) {
  return *std::find_if(block.fibers.begin(), block.fibers.end(),
                       [](const Fiber& f) { return f.state == State::kExited; });
}

// A warp barrier of the lanes in `mask`; every lane that arrives must name the same lanes.
void warp_barrier(Warp& warp, unsigned mask, const char* what) {
  if (warp.barrier.arrived == 0) {
    warp.barrier.mask = mask;
    warp.barrier.expected = __builtin_popcount(mask);
  } else if (warp.barrier.mask != mask) {
    fault(describe(running->fibers[running->current].index) + ": lanes of one warp " + what +
          " with different masks");
  }
  arrive_and_wait(warp.barrier);
}

std::string deadlock_report(const Block& block) {
  size_t at_shuffle = 0;
  for (const Warp& warp : block.warps) at_shuffle += warp.barrier.waiters.size();
  return "deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
         "," + std::to_string(blockIdx.z) + "): " +
         std::to_string(block.syncthreads.waiters.size()) + " threads wait at __syncthreads, " +
         std::to_string(at_shuffle) + " at a warp shuffle, " + std::to_string(block.exited) +
         " exited";
}

// Runs one block to completion; returns the fault, if any.
std::string run_block(Block& block, dim3 block_dim, std::mt19937_64* shuffle) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  block.fibers.resize(threads);
  block.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
  block.syncthreads = Barrier{};
  block.syncthreads.expected = threads;
  block.exited = 0;
  block.fault.clear();
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  if (shuffle != nullptr) std::shuffle(order.begin(), order.end(), *shuffle);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    fiber.index = {t % block_dim.x, t / block_dim.x % block_dim.y,
                   t / (block_dim.x * block_dim.y)};
    fiber.state = State::kReady;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stack_pool()[t].base;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_main, 0);
  }
  while (block.exited < threads) {
    bool progressed = false;
    for (int t : order) {
      Fiber& fiber = block.fibers[t];
      if (fiber.state != State::kReady) continue;
      block.current = t;
      threadIdx = fiber.index;
      swapcontext(&block.scheduler, &fiber.context);
      if (!block.fault.empty()) return block.fault;
      progressed = true;
    }
    if (!progressed) return deadlock_report(block);
  }
  return {};
}

bool valid_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && threads >= 1 && threads <= kMaxThreadsPerBlock && block.z <= 64;
}

cudaError_t set_error(cudaError_t error) {
  if (error != cudaSuccess) last_error = error;
  return error;
}

}  // namespace

void* dynamic_shared_memory() { return dynamic_shared; }

void warp_exchange(unsigned mask, const void* value, void* out, size_t bytes,
                   int (*source_lane)(int lane, int arg, int width), int arg, int width) {
  Block& block = *running;
  const int thread = block.current;
  const int lane = thread % kWarpSize;
  const Fiber* warp_fibers = &block.fibers[thread - lane];
  const int lanes_present =
      std::min<int>(kWarpSize, static_cast<int>(block.fibers.size()) - (thread - lane));
  Warp& warp = block.warps[thread / kWarpSize];
  auto who = [&] { return describe(block.fibers[thread].index) + ": shuffle "; };
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fault(who() + "width " + std::to_string(width) + " is not a power of two <= 32");
  }
  if (!(mask >> lane & 1u)) fault(who() + "by a lane outside its own mask");
  if (lanes_present < kWarpSize && (mask >> lanes_present) != 0) {
    fault(who() + "mask names lanes the block does not have");
  }
  for (int l = 0; l < lanes_present; ++l) {
    if ((mask >> l & 1u) && warp_fibers[l].state == State::kExited) {
      fault(who() + "waits for lane " + std::to_string(l) + ", which exited");
    }
  }
  std::memcpy(warp.slot[lane], value, bytes);
  warp_barrier(warp, mask, "shuffle");
  const int source = source_lane(lane, arg, width);
  if (!(mask >> source & 1u)) {
    fault(who() + "reads lane " + std::to_string(source) + ", which is not in the mask");
  }
  std::memcpy(out, warp.slot[source], bytes);
  warp_barrier(warp, mask, "shuffle");  // no lane overwrites its slot before every lane has read
}

cudaError_t set_max_dynamic_shared_bytes(const void* kernel, int bytes) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  if (bytes < 0 || bytes > kMaxDynamicSharedBytesOptin) return set_error(cudaErrorInvalidValue);
  max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

const char* demangled(const std::type_info& type) {
  static std::map<const std::type_info*, std::string> names;
  auto found = names.find(&type);
  if (found == names.end()) {
    int status = 0;
    char* name = abi::__cxa_demangle(type.name(), nullptr, nullptr, &status);
    found = names.emplace(&type, status == 0 ? name : type.name()).first;
    std::free(name);
  }
  return found->second.c_str();
}

cudaError_t launch(const void* kernel, const char* signature, dim3 grid, dim3 block_dim,
                   size_t shared_bytes, const std::function<void()>& thread_body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  last_fault_message.clear();
  launch_log.push_back("grid=(" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                       std::to_string(grid.z) + ") block=(" + std::to_string(block_dim.x) + "," +
                       std::to_string(block_dim.y) + "," + std::to_string(block_dim.z) +
                       ") shared=" + std::to_string(shared_bytes) + " kernel=" + signature);
  if (!valid_configuration(grid, block_dim)) return set_error(cudaErrorInvalidConfiguration);
  const auto limit = max_dynamic_shared.find(kernel);
  const size_t max_shared =
      limit == max_dynamic_shared.end() ? kDefaultDynamicSharedBytes : limit->second;
  if (shared_bytes > max_shared) return set_error(cudaErrorInvalidValue);

  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 shuffle(schedule_seed);
  if (schedule_seed != 0) std::shuffle(order.begin(), order.end(), shuffle);

  reserve_stacks(block_dim.x * block_dim.y * block_dim.z);
  gridDim = grid;
  blockDim = block_dim;
  Block block;
  running = &block;
  running_body = &thread_body;
  std::string fault;
  for (uint64_t b : order) {
    blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    std::memset(dynamic_shared, 0xff, shared_bytes);  // NaN in every float type, -1 in integers
    fault = run_block(block, block_dim, schedule_seed != 0 ? &shuffle : nullptr);
    if (!fault.empty()) break;
  }
  running = nullptr;
  running_body = nullptr;
  if (fault.empty()) return cudaSuccess;
  last_fault_message = fault;
  return set_error(cudaErrorLaunchFailure);
}

}  // namespace cuda_emulation

using namespace cuda_emulation;

void __syncthreads() {
  Block& block = *running;
  if (block.exited > 0) {  // the barrier waits for every thread of the block: it would never open
    fault(describe(block.fibers[block.current].index) + ": __syncthreads after " +
          describe(first_exited(block).index) + " exited");
  }
  arrive_and_wait(block.syncthreads);
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = kMaxDynamicSharedBytesOptin;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

// ---- controls for the tests (through ctypes) -----------------------------------------------------

extern "C" {

void uk_emu_set_schedule_seed(uint64_t seed) { schedule_seed = seed; }

void uk_emu_set_force_int64_index(int force) { force_int64_index = force != 0; }

const char* uk_emu_last_fault() { return last_fault_message.c_str(); }

int uk_emu_launch_count() { return static_cast<int>(launch_log.size()); }

// "grid=(x,y,z) block=(x,y,z) shared=bytes kernel=<its type>" of launch i since the last clear.
const char* uk_emu_launch_record(int i) {
  return i >= 0 && i < uk_emu_launch_count() ? launch_log[i].c_str() : "";
}

void uk_emu_clear_launch_log() { launch_log.clear(); }

}  // extern "C"
