// The execution model of cuda_on_cpu.h: blocks one after another, a block's threads as fibers
// switched at barriers and warp shuffles, the model's errors raised from the launch.
#include "cuda_on_cpu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace cuda_on_cpu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per thread; touched pages only are committed
constexpr unsigned kMaxThreadsPerBlock = 1024, kMaxGridYZ = 65535;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute, as the kernels run

// ---------------------------------------------------------------- fibers
// A fiber's context and the switch between two. On x86-64 the switch saves the callee-saved
// registers on the stack it leaves and restores them from the one it enters (glibc's swapcontext
// also saves the signal mask, a system call per switch, which the warp shuffles cannot afford:
// thousands of switches per block); elsewhere ucontext.

[[noreturn]] void fiber_entry();

#if defined(__x86_64__)
struct Context {
  void* stack_pointer = nullptr;
};

extern "C" void cuda_on_cpu_switch(void** save, void* load);
asm(R"(
  .pushsection .text
  .p2align 4
  .type cuda_on_cpu_switch, @function
cuda_on_cpu_switch:
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
  .size cuda_on_cpu_switch, .-cuda_on_cpu_switch
  .popsection
)");

// A fiber that enters fiber_entry on its first switch: six zero registers to pop, then the address
// to return to, with the stack aligned as a call leaves it.
void start(Context& fiber, char* stack, size_t bytes) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top) - 8;  // 6 registers, the entry, a zero return address
  for (int i = 0; i < 6; ++i) slots[i] = nullptr;
  slots[6] = reinterpret_cast<void*>(&fiber_entry);
  slots[7] = nullptr;
  fiber.stack_pointer = slots;
}

void switch_context(Context& from, Context& to) { cuda_on_cpu_switch(&from.stack_pointer, to.stack_pointer); }
#else
struct Context {
  ucontext_t context;
};

void start(Context& fiber, char* stack, size_t bytes) {
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack;
  fiber.context.uc_stack.ss_size = bytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(&fiber_entry), 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif

// ---------------------------------------------------------------- blocks

enum class State { Ready, AtBarrier, AtShuffle, Done };

struct Thread {
  Context context;
  dim3 index;
  State state = State::Ready;
  int barriers = 0;  // __syncthreads reached so far
  int shuffles = 0;  // shuffles reached so far
};

struct Order {
  std::string name = "forward";  // forward, reverse or shuffled
  uint64_t seed = 0;
};
Order thread_order;

struct Block {
  dim3 grid, dim, index;
  const std::function<void()>* kernel = nullptr;
  std::vector<Thread> threads;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> lanes;  // [warp][parity][lane]: consecutive shuffles alternate buffers
  Context scheduler;
  int current = -1;
  std::exception_ptr error;
  std::mt19937_64 random;
};

thread_local Block* running = nullptr;

// Fiber stacks, kept for the next launch.
std::vector<std::unique_ptr<char[]>>& stacks(size_t count) {
  static thread_local std::vector<std::unique_ptr<char[]>> kept;
  while (kept.size() < count) kept.emplace_back(new char[kStackBytes]);
  return kept;
}

Block& block() {
  TORCH_CHECK(running != nullptr, "cuda_on_cpu: a kernel built-in was used outside a launch");
  return *running;
}

Thread& this_thread() { return block().threads[block().current]; }

void yield(State state) {
  Thread& t = this_thread();
  t.state = state;
  switch_context(t.context, block().scheduler);
}

// Every fiber's start: the kernel as this thread, then back to the scheduler for good.
void fiber_entry() {
  try {
    (*running->kernel)();
  } catch (...) {
    running->error = std::current_exception();
  }
  yield(State::Done);
  std::abort();  // a finished thread is never resumed
}

// "3, 7-9" for the sorted thread numbers of `members`.
std::string ranges(const std::vector<int>& members) {
  std::ostringstream out;
  for (size_t i = 0; i < members.size();) {
    size_t j = i;
    while (j + 1 < members.size() && members[j + 1] == members[j] + 1) ++j;
    out << (i ? ", " : "") << members[i];
    if (j > i) out << "-" << members[j];
    i = j + 1;
  }
  return out.str();
}

std::string where(const Block& b) {
  std::ostringstream out;
  out << "block (" << b.index.x << ", " << b.index.y << ", " << b.index.z << ")";
  return out.str();
}

std::vector<int> threads_in(const Block& b, int begin, int end, State state) {
  std::vector<int> found;
  for (int i = begin; i < end; ++i)
    if (b.threads[i].state == state) found.push_back(i);
  return found;
}

// Releases every warp whose lanes all wait at the same shuffle; raises for a warp that waits
// there with some lanes elsewhere (nothing else can run once the Ready threads have run).
bool release_warps(Block& b) {
  bool released = false;
  const int count = static_cast<int>(b.threads.size());
  for (int w = 0; w * kWarpSize < count; ++w) {
    const int begin = w * kWarpSize, end = std::min(count, begin + kWarpSize);
    int waiting = 0, shuffle = -1;
    bool same = true;
    for (int i = begin; i < end; ++i) {
      if (b.threads[i].state != State::AtShuffle) continue;
      ++waiting;
      same = same && (shuffle < 0 || b.threads[i].shuffles == shuffle);
      shuffle = b.threads[i].shuffles;
    }
    if (waiting == 0) continue;
    TORCH_CHECK(waiting == end - begin && same, "cuda_on_cpu: ", where(b), ", warp ", w, ": threads ",
                ranges(threads_in(b, begin, end, State::AtShuffle)), " wait at a warp shuffle that threads ",
                ranges(threads_in(b, begin, end, State::Done)), " returned before and threads ",
                ranges(threads_in(b, begin, end, State::AtBarrier)), " wait at __syncthreads instead",
                same ? "" : " (and the waiting lanes are at different shuffles)");
    for (int i = begin; i < end; ++i) b.threads[i].state = State::Ready;
    released = true;
  }
  return released;
}

// Releases the block's barrier once every thread waits at the same one; raises otherwise.
void release_barrier(Block& b) {
  const int count = static_cast<int>(b.threads.size());
  const auto waiting = threads_in(b, 0, count, State::AtBarrier);
  const auto returned = threads_in(b, 0, count, State::Done);
  TORCH_CHECK(returned.empty(), "cuda_on_cpu: ", where(b), ": divergent __syncthreads: threads ", ranges(waiting),
              " wait at barrier ", b.threads[waiting.front()].barriers, " while threads ", ranges(returned),
              " have returned");
  const int barrier = b.threads[waiting.front()].barriers;
  std::vector<int> elsewhere;
  for (int i : waiting)
    if (b.threads[i].barriers != barrier) elsewhere.push_back(i);
  TORCH_CHECK(elsewhere.empty(), "cuda_on_cpu: ", where(b), ": threads wait at different __syncthreads: threads ",
              ranges(elsewhere), " are not at barrier ", barrier, " of thread ", waiting.front());
  for (Thread& t : b.threads) t.state = State::Ready;
}

std::vector<int> run_order(Block& b) {
  std::vector<int> order(b.threads.size());
  std::iota(order.begin(), order.end(), 0);
  if (thread_order.name == "reverse") std::reverse(order.begin(), order.end());
  if (thread_order.name == "shuffled") std::shuffle(order.begin(), order.end(), b.random);
  return order;
}

void run_block(Block& b) {
  auto& kept = stacks(b.threads.size());
  for (size_t i = 0; i < b.threads.size(); ++i) {
    Thread& t = b.threads[i];
    t.index = dim3(i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y));
    t.state = State::Ready;
    t.barriers = t.shuffles = 0;
    start(t.context, kept[i].get(), kStackBytes);
  }
  std::fill(b.shared.begin(), b.shared.end(), 0xff);
  for (;;) {
    for (int i : run_order(b)) {
      if (b.threads[i].state != State::Ready) continue;
      b.current = i;
      switch_context(b.scheduler, b.threads[i].context);
      if (b.error) std::rethrow_exception(b.error);
    }
    if (std::all_of(b.threads.begin(), b.threads.end(), [](const Thread& t) { return t.state == State::Done; }))
      return;
    if (!release_warps(b)) release_barrier(b);
  }
}

void set_thread_order(std::string order, int64_t seed) {
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "shuffled",
              "thread order must be 'forward', 'reverse' or 'shuffled', got '", order, "'");
  thread_order = {order, static_cast<uint64_t>(seed)};
}

}  // namespace

const dim3& thread_index() { return this_thread().index; }
const dim3& block_index() { return block().index; }
const dim3& block_dim() { return block().dim; }
const dim3& grid_dim() { return block().grid; }

unsigned char* dynamic_shared() {
  Block& b = block();
  TORCH_CHECK(!b.shared.empty(), "cuda_on_cpu: the kernel uses dynamic shared memory but was launched with none");
  return b.shared.data();
}

void sync_threads() {
  ++this_thread().barriers;
  yield(State::AtBarrier);
}

void shuffle_down(void* value, int bytes, unsigned offset) {
  Block& b = block();
  Thread& t = this_thread();
  const int thread = b.current, warp = thread / kWarpSize, lane = thread % kWarpSize;
  uint64_t* slots = b.lanes.data() + (2 * warp + t.shuffles % 2) * kWarpSize;
  std::memcpy(&slots[lane], value, bytes);
  ++t.shuffles;
  yield(State::AtShuffle);
  const int source = lane + static_cast<int>(offset);
  if (source < kWarpSize && warp * kWarpSize + source < static_cast<int>(b.threads.size()))
    std::memcpy(value, &slots[source], bytes);
}

void launch(dim3 grid, dim3 dim, size_t shared_bytes, const std::function<void()>& kernel) {
  TORCH_CHECK(running == nullptr, "cuda_on_cpu: a launch inside a kernel");
  const size_t threads = static_cast<size_t>(dim.x) * dim.y * dim.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock, "cuda_on_cpu: a block of ", threads,
              " threads; CUDA allows 1..", kMaxThreadsPerBlock);
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= kMaxGridYZ && grid.z >= 1 && grid.z <= kMaxGridYZ,
              "cuda_on_cpu: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") outside CUDA's limits (y, z <= ",
              kMaxGridYZ, ")");
  TORCH_CHECK(shared_bytes <= kMaxDynamicShared, "cuda_on_cpu: ", shared_bytes,
              " bytes of dynamic shared memory; a launch gets at most ", kMaxDynamicShared, " without opting in");
  Block b;
  b.grid = grid;
  b.dim = dim;
  b.kernel = &kernel;
  b.threads.resize(threads);
  b.shared.resize(shared_bytes);
  b.lanes.resize(2 * (threads + kWarpSize - 1) / kWarpSize * kWarpSize);
  b.random.seed(thread_order.seed);
  running = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.index = dim3(x, y, z);
          run_block(b);
        }
  } catch (...) {
    running = nullptr;
    throw;
  }
  running = nullptr;
}

void define_controls(torch::Library& m) {
  m.def("set_thread_order(str order, int seed=0) -> ()", &set_thread_order);
}

}  // namespace cuda_on_cpu
