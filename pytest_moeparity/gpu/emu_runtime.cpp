// CPU emulator of the kernels in kernels.cu (development and CI aid; see emulator.py).
//
// kernels.cu is compiled as plain C++ with MOEPARITY_EMULATOR defined. Each launch runs every
// block of the grid; the threads of a block are coroutines (ucontext) so that the warp reduction
// (mp_emu_warp_allreduce) is a real synchronisation point of its 32 lanes, computing the same xor
// butterfly as __shfl_xor_sync, and __syncthreads (mp_emu_syncthreads) one of the whole block. A
// warp whose lanes disagree (some exited, some wait), or a block that can make no progress, is
// reported as an error, as is any access that runs past
// the end of an argument array (arrays are copied next to a PROT_NONE guard page and SIGSEGV
// is turned into an error naming the argument). A thread's cp.async copies land in shared memory only
// when it waits for their group (mp_emu_cp_wait), as on the GPU they may land any time before: a read
// of a staged byte before its wait sees what was there before, and a block whose threads exit with
// copies never waited for is an error.
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/mman.h>
#include <type_traits>
#include <ucontext.h>
#include <unistd.h>
#include <utility>
#include <vector>

#define MOEPARITY_EMULATOR 1
#define __restrict__ __restrict

struct mp_dim3 {
    unsigned x, y, z;
};
static mp_dim3 threadIdx, blockIdx, blockDim, gridDim;

void mp_emu_warp_allreduce(float* v, int n);
void mp_emu_warp_allreduce_max(float* v, int n);
void mp_emu_syncthreads();
typedef unsigned int mp_emu_u32;
void mp_emu_mma_u8s8(const mp_emu_u32* a, const mp_emu_u32* b, int* d);
void mp_emu_mma_s8s8_k16(const mp_emu_u32* a, const mp_emu_u32* b, int* d);
float mp_emu_shfl_xor(float v, int off);
float mp_emu_shfl_idx(float v, int src);
mp_emu_u32 mp_emu_warp_redux_u32(mp_emu_u32 v, int is_min);
void mp_emu_misaligned(const void* p, int n);
void mp_emu_cp_async16(void* dst, const void* src);
void mp_emu_cp_commit();
void mp_emu_cp_wait(int pending);

#include MP_KERNELS_PATH

// ---- lanes as coroutines ----------------------------------------------------------------------
namespace {

const int kMaxReduce = 64;
const size_t kStack = 256 * 1024;
const unsigned kMaxThreads = 1024;

struct Lane {
    ucontext_t ctx;
    char* stack;
    bool done;
    bool waiting;   // at a warp reduction
    bool barrier;   // at __syncthreads
    int n;
    int op;  // 0: sum, 1: max, 2: mma k32 u8 x s8 (vals hold the bits of a[4], b[2], then of d[4]), 3: xor exchange
             // (vals: v, offset), 4: mma k16 s8 x s8 (vals: a[2], b[1], then d[4]), 5: exchange from a lane
             // (vals: v, lane), 6: redux.sync max / min u32 (vals: the bits of v, then 1 for min)
    float vals[kMaxReduce];
    unsigned tid;
    struct Copy {
        unsigned char* dst;
        unsigned char bytes[16];
        int group;  // 0: not yet committed; else the group's number (1, 2, ... in commit order)
    };
    std::vector<Copy> copies;  // cp.async copies issued and not yet landed
    int groups;                // groups committed
};

Lane g_lanes[kMaxThreads];  // the threads of one block; thread i is lane i % 32 of warp i / 32
ucontext_t g_sched;
int g_cur = 0;
void (*g_invoke)(void**) = nullptr;
void** g_args = nullptr;
std::string g_error;

sigjmp_buf g_jmp;
volatile sig_atomic_t g_in_launch = 0;
volatile void* g_fault_addr = nullptr;

void lane_entry() {
    g_invoke(g_args);
    g_lanes[g_cur].done = true;
    // returning resumes uc_link (the scheduler)
}

void set_thread(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = (tid / blockDim.x) % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// Every thread of the block as a coroutine: run each until it finishes or waits (at a warp reduction
// or the block barrier), then complete the reductions whose 32 lanes all wait, or release the barrier
// once every thread waits there; anything else that stops all progress is reported.
bool run_block_coroutines(unsigned n_threads) {
    for (unsigned i = 0; i < n_threads; ++i) {
        Lane& L = g_lanes[i];
        L.done = false;
        L.waiting = L.barrier = false;
        L.tid = i;
        L.copies.clear();
        L.groups = 0;
        if (!L.stack) L.stack = (char*)std::malloc(kStack);
        getcontext(&L.ctx);
        L.ctx.uc_stack.ss_sp = L.stack;
        L.ctx.uc_stack.ss_size = kStack;
        L.ctx.uc_link = &g_sched;
        makecontext(&L.ctx, lane_entry, 0);
    }
    char buf[320];
    for (;;) {
        for (unsigned i = 0; i < n_threads; ++i) {
            Lane& L = g_lanes[i];
            if (L.done || L.waiting || L.barrier) continue;
            g_cur = (int)i;
            set_thread(L.tid);
            swapcontext(&g_sched, &L.ctx);
        }
        bool progress = false;
        unsigned n_done = 0, n_barrier = 0;
        for (unsigned w0 = 0; w0 < n_threads; w0 += 32) {
            const unsigned nl = n_threads - w0 < 32 ? n_threads - w0 : 32;
            int n_wait = 0, n = -1, op = -1;
            bool mismatch = false;
            for (unsigned i = w0; i < w0 + nl; ++i) {
                const Lane& L = g_lanes[i];
                n_done += L.done;
                n_barrier += L.barrier;
                if (!L.waiting) continue;
                ++n_wait;
                if (n < 0) n = L.n, op = L.op;
                else if (L.n != n || L.op != op) mismatch = true;
            }
            if (n_wait == 0) continue;
            if (n_wait != 32) {
                int w_done = 0;
                for (unsigned i = w0; i < w0 + nl; ++i) w_done += g_lanes[i].done;
                std::snprintf(buf, sizeof buf,
                              "divergent warp: %d lanes wait at a warp reduction while %d lanes exited "
                              "(block %u,%u,%u, first thread %u)",
                              n_wait, w_done + (int)(32 - nl), blockIdx.x, blockIdx.y, blockIdx.z, w0);
                g_error = buf;
                return false;
            }
            if (mismatch) {
                g_error = "warp reduction called with different lengths or operations by different lanes";
                return false;
            }
            if (op == 2 || op == 4) {  // mma.m16n8k32 u8 x s8 / m16n8k16 s8 x s8 -> s32: all 32 lanes' fragments
                const int kdim = op == 2 ? 32 : 16;
                int A[16][32], B[32][8];
                for (int i = 0; i < 32; ++i) {
                    std::uint32_t w[6];
                    std::memcpy(w, g_lanes[w0 + i].vals, sizeof w);
                    const int g = i >> 2, t = i & 3;
                    for (int q = 0; q < 4; ++q) {
                        const auto byte = [&](int r) { return (w[r] >> (8 * q)) & 0xFFu; };
                        if (op == 2) {  // a[4] unsigned (rows g, g + 8; k and 16 + k), b[2] signed
                            A[g][4 * t + q] = (int)byte(0);
                            A[g + 8][4 * t + q] = (int)byte(1);
                            A[g][16 + 4 * t + q] = (int)byte(2);
                            A[g + 8][16 + 4 * t + q] = (int)byte(3);
                            B[4 * t + q][g] = (int)(signed char)byte(4);
                            B[16 + 4 * t + q][g] = (int)(signed char)byte(5);
                        } else {  // a[2] signed (rows g, g + 8), b[1] signed
                            A[g][4 * t + q] = (int)(signed char)byte(0);
                            A[g + 8][4 * t + q] = (int)(signed char)byte(1);
                            B[4 * t + q][g] = (int)(signed char)byte(2);
                        }
                    }
                }
                for (int i = 0; i < 32; ++i) {
                    const int g = i >> 2, t = i & 3;
                    int d[4] = {0, 0, 0, 0};
                    for (int k = 0; k < kdim; ++k) {
                        d[0] += A[g][k] * B[k][2 * t];
                        d[1] += A[g][k] * B[k][2 * t + 1];
                        d[2] += A[g + 8][k] * B[k][2 * t];
                        d[3] += A[g + 8][k] * B[k][2 * t + 1];
                    }
                    std::memcpy(g_lanes[w0 + i].vals, d, sizeof d);
                    g_lanes[w0 + i].waiting = false;
                }
                progress = true;
                continue;
            }
            if (op == 3 || op == 5) {  // __shfl_xor_sync(mask, v, off) (3: every lane gets lane (i ^ off)'s v;
                                       // off the same in every lane) or __shfl_sync(mask, v, src) (5: lane src's)
                const int off = (int)g_lanes[w0].vals[1];
                float got[32];
                for (int i = 0; i < 32; ++i) {
                    const int arg = (int)g_lanes[w0 + i].vals[1];
                    if (op == 3 && arg != off) {
                        g_error = "warp exchange called with different offsets by different lanes";
                        return false;
                    }
                    if (arg < 0 || arg > 31) {
                        g_error = "warp exchange with a lane outside 0..31";
                        return false;
                    }
                    got[i] = g_lanes[w0 + (op == 3 ? i ^ arg : arg)].vals[0];
                }
                for (int i = 0; i < 32; ++i) {
                    g_lanes[w0 + i].vals[0] = got[i];
                    g_lanes[w0 + i].waiting = false;
                }
                progress = true;
                continue;
            }
            if (op == 6) {  // redux.sync.{max,min}.u32: every lane gets the warp's largest / smallest v
                const bool mn = g_lanes[w0].vals[1] != 0.0f;
                mp_emu_u32 r = mn ? 0xFFFFFFFFu : 0u;
                for (int i = 0; i < 32; ++i) {
                    if ((g_lanes[w0 + i].vals[1] != 0.0f) != mn) {
                        g_error = "warp redux called as max by some lanes and min by others";
                        return false;
                    }
                    mp_emu_u32 u;
                    std::memcpy(&u, &g_lanes[w0 + i].vals[0], sizeof u);
                    r = mn ? (u < r ? u : r) : (u > r ? u : r);
                }
                for (int i = 0; i < 32; ++i) {
                    std::memcpy(&g_lanes[w0 + i].vals[0], &r, sizeof r);
                    g_lanes[w0 + i].waiting = false;
                }
                progress = true;
                continue;
            }
            // xor butterfly, exactly as `v += __shfl_xor_sync(mask, v, off)` (op 0) or
            // `v = fmaxf(v, __shfl_xor_sync(mask, v, off))` (op 1) for off = 16..1
            float cur[32][kMaxReduce], nxt[32][kMaxReduce];
            for (int i = 0; i < 32; ++i)
                for (int t = 0; t < n; ++t) cur[i][t] = g_lanes[w0 + i].vals[t];
            for (int off = 16; off > 0; off >>= 1) {
                for (int i = 0; i < 32; ++i)
                    for (int t = 0; t < n; ++t)
                        nxt[i][t] = op == 1 ? std::fmax(cur[i][t], cur[i ^ off][t]) : cur[i][t] + cur[i ^ off][t];
                std::memcpy(cur, nxt, sizeof cur);
            }
            for (int i = 0; i < 32; ++i) {
                for (int t = 0; t < n; ++t) g_lanes[w0 + i].vals[t] = cur[i][t];
                g_lanes[w0 + i].waiting = false;
            }
            progress = true;
        }
        if (progress) continue;
        if (n_done == n_threads) {
            for (unsigned i = 0; i < n_threads; ++i)
                if (!g_lanes[i].copies.empty()) {
                    std::snprintf(buf, sizeof buf, "block %u,%u,%u: thread %u exited with %zu cp.async copies never "
                                  "waited for", blockIdx.x, blockIdx.y, blockIdx.z, i, g_lanes[i].copies.size());
                    g_error = buf;
                    return false;
                }
            return true;
        }
        if (n_barrier == n_threads) {  // every thread at __syncthreads (none exited before it)
            for (unsigned i = 0; i < n_threads; ++i) g_lanes[i].barrier = false;
            continue;
        }
        std::snprintf(buf, sizeof buf,
                      "block %u,%u,%u cannot go on: %u threads wait at __syncthreads, %u exited, the others "
                      "wait at a warp reduction",
                      blockIdx.x, blockIdx.y, blockIdx.z, n_barrier, n_done);
        g_error = buf;
        return false;
    }
}

int g_misaligned_bytes = 0;  // the width of the misaligned load that ended the launch

void segv_handler(int sig, siginfo_t* info, void*) {
    if (!g_in_launch) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_fault_addr = info->si_addr;
    siglongjmp(g_jmp, 1);
}

}  // namespace

// A wide load the GPU would refuse (kernels.cu: mp_aligned_load): the launch ends as on a fault, at p
void mp_emu_misaligned(const void* p, int n) {
    g_fault_addr = const_cast<void*>(p);
    g_misaligned_bytes = n;
    siglongjmp(g_jmp, 2);
}

static void mp_emu_warp_reduce_op(float* v, int n, int op) {
    Lane& L = g_lanes[g_cur];
    if (n > kMaxReduce) {
        std::fprintf(stderr, "mp_emu_warp_allreduce: n=%d too large\n", n);
        std::abort();
    }
    for (int t = 0; t < n; ++t) L.vals[t] = v[t];
    L.n = n;
    L.op = op;
    L.waiting = true;
    swapcontext(&L.ctx, &g_sched);
    for (int t = 0; t < n; ++t) v[t] = L.vals[t];
}

void mp_emu_warp_allreduce(float* v, int n) { mp_emu_warp_reduce_op(v, n, 0); }

void mp_emu_warp_allreduce_max(float* v, int n) { mp_emu_warp_reduce_op(v, n, 1); }

void mp_emu_mma_u8s8(const mp_emu_u32* a, const mp_emu_u32* b, int* d) {
    Lane& L = g_lanes[g_cur];
    std::memcpy(L.vals, a, 4 * sizeof(mp_emu_u32));
    std::memcpy(L.vals + 4, b, 2 * sizeof(mp_emu_u32));
    L.n = 6;
    L.op = 2;
    L.waiting = true;
    swapcontext(&L.ctx, &g_sched);
    std::memcpy(d, L.vals, 4 * sizeof(int));
}

void mp_emu_mma_s8s8_k16(const mp_emu_u32* a, const mp_emu_u32* b, int* d) {
    Lane& L = g_lanes[g_cur];
    std::memcpy(L.vals, a, 2 * sizeof(mp_emu_u32));
    std::memcpy(L.vals + 2, b, sizeof(mp_emu_u32));
    L.n = 3;
    L.op = 4;
    L.waiting = true;
    swapcontext(&L.ctx, &g_sched);
    std::memcpy(d, L.vals, 4 * sizeof(int));
}

// a lane exchange (op 3: xor with arg, 5: from lane arg)
static float emu_exchange(float v, int arg, int op) {
    Lane& L = g_lanes[g_cur];
    L.vals[0] = v;
    L.vals[1] = (float)arg;
    L.n = 2;
    L.op = op;
    L.waiting = true;
    swapcontext(&L.ctx, &g_sched);
    return L.vals[0];
}
float mp_emu_shfl_idx(float v, int src) { return emu_exchange(v, src, 5); }
float mp_emu_shfl_xor(float v, int off) { return emu_exchange(v, off, 3); }

mp_emu_u32 mp_emu_warp_redux_u32(mp_emu_u32 v, int is_min) {
    Lane& L = g_lanes[g_cur];
    std::memcpy(&L.vals[0], &v, sizeof v);
    L.vals[1] = is_min ? 1.0f : 0.0f;
    L.n = 2;
    L.op = 6;
    L.waiting = true;
    swapcontext(&L.ctx, &g_sched);
    mp_emu_u32 r;
    std::memcpy(&r, &L.vals[0], sizeof r);
    return r;
}

// cp.async of 16 bytes: the source read now, the bytes written to dst when the thread waits for the group
void mp_emu_cp_async16(void* dst, const void* src) {
    Lane::Copy c;
    c.dst = static_cast<unsigned char*>(dst);
    std::memcpy(c.bytes, src, 16);
    c.group = 0;
    g_lanes[g_cur].copies.push_back(c);
}

// cp.async.commit_group: the copies issued since the last commit form the next group
void mp_emu_cp_commit() {
    Lane& L = g_lanes[g_cur];
    ++L.groups;
    for (auto& c : L.copies)
        if (c.group == 0) c.group = L.groups;
}

// cp.async.wait_group pending: the copies of every committed group but the `pending` latest land
void mp_emu_cp_wait(int pending) {
    Lane& L = g_lanes[g_cur];
    std::vector<Lane::Copy> left;
    for (const auto& c : L.copies) {
        if (c.group != 0 && c.group <= L.groups - pending) std::memcpy(c.dst, c.bytes, 16);
        else left.push_back(c);
    }
    L.copies.swap(left);
}

void mp_emu_syncthreads() {
    Lane& L = g_lanes[g_cur];
    L.barrier = true;
    swapcontext(&L.ctx, &g_sched);
}

// ---- argument marshalling -------------------------------------------------------------------------

template <typename... A, std::size_t... I>
static void mp_call_impl(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
}

template <typename... A>
static void mp_call(void (*f)(A...), void** args) {
    mp_call_impl(f, args, std::index_sequence_for<A...>{});
}

template <typename T>
static int mp_code() {
    if (std::is_pointer<T>::value) return 0;
    if (std::is_floating_point<T>::value) return 100 + (int)sizeof(T);
    return 200 + (int)sizeof(T);
}

// sizes[i]: 0 pointer, 100+n float of n bytes, 200+n integer of n bytes
template <typename... A>
static int mp_signature(void (*)(A...), int* codes, int max) {
    int tmp[] = {0, mp_code<A>()...};
    int n = (int)sizeof...(A);
    for (int i = 0; i < n && i < max; ++i) codes[i] = tmp[i + 1];
    return n;
}

struct MpEntry {
    const char* name;
    void (*invoke)(void**);
    int (*signature)(int*, int);
};

#include MP_TABLE_PATH

static const MpEntry* find_entry(const char* name) {
    for (size_t i = 0; i < sizeof(mp_table) / sizeof(mp_table[0]); ++i)
        if (std::strcmp(mp_table[i].name, name) == 0) return &mp_table[i];
    return nullptr;
}

extern "C" {

int emu_signature(const char* name, int* codes, int max) {
    const MpEntry* e = find_entry(name);
    if (!e) return -1;
    return e->signature(codes, max);
}

// Guarded buffers: data ends exactly where a PROT_NONE page begins.
// nbytes ending at most 15 bytes before a guard page, starting at `offset` mod 16 (the address mod 16 of
// the array it stands for: the kernels' alignment checks see what they would see on the GPU)
void* emu_guarded_alloc(size_t nbytes, size_t offset, void** base_out, size_t* map_len_out) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t data_pages = (nbytes + page - 1) / page;
    if (data_pages == 0) data_pages = 1;
    if ((nbytes + 15) / page >= data_pages) data_pages += 1;  // room for the slack
    size_t len = (data_pages + 1) * page;
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    char* guard = (char*)base + data_pages * page;
    mprotect(guard, page, PROT_NONE);
    *base_out = base;
    *map_len_out = len;
    char* data = guard - nbytes;
    data -= ((size_t)data - offset) & 15;
    return data;
}

void emu_guarded_free(void* base, size_t len) { munmap(base, len); }

// Returns 0 on success; 1 with `err` filled on a kernel error; 2 on a fault (fault address in
// *fault_addr); 3 on a misaligned wide load (its address in *fault_addr, its width in `err`); -1 for an
// unknown kernel.
int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
               void** args, int coroutines, char* err, int err_len, void** fault_addr) {
    const MpEntry* e = find_entry(name);
    if (!e) return -1;
    g_invoke = e->invoke;
    g_args = args;
    g_error.clear();
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    unsigned n_threads = bx * by * bz;
    if (coroutines && n_threads > kMaxThreads) {
        std::snprintf(err, err_len, "block of %u threads: the emulator runs at most %u", n_threads, kMaxThreads);
        return 1;
    }

    struct sigaction sa, old;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old);
    struct sigaction old_bus;
    sigaction(SIGBUS, &sa, &old_bus);
    int rc = 0;
    const int jumped = sigsetjmp(g_jmp, 1);
    if (jumped != 0) {
        g_in_launch = 0;
        *fault_addr = (void*)g_fault_addr;
        sigaction(SIGSEGV, &old, nullptr);
        sigaction(SIGBUS, &old_bus, nullptr);
        if (jumped == 2) {
            std::snprintf(err, err_len, "%d", g_misaligned_bytes);
            return 3;
        }
        return 2;
    }
    g_in_launch = 1;
    for (unsigned z = 0; z < gz && rc == 0; ++z)
        for (unsigned y = 0; y < gy && rc == 0; ++y)
            for (unsigned x = 0; x < gx && rc == 0; ++x) {
                blockIdx = {x, y, z};
                if (coroutines) {
                    if (!run_block_coroutines(n_threads)) rc = 1;
                } else {
                    for (unsigned i = 0; i < n_threads; ++i) {
                        set_thread(i);
                        e->invoke(args);
                    }
                }
            }
    g_in_launch = 0;
    sigaction(SIGSEGV, &old, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    if (rc) std::snprintf(err, err_len, "%s", g_error.c_str());
    return rc;
}

}  // extern "C"
