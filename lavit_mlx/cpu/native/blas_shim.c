/* The BLAS entry points MLX's CPU backend calls, bound at run time to a fast BLAS
 * (built and loaded by lavit_mlx/cpu/runtime.py before MLX is imported).
 *
 * libmlx.so calls cblas_sgemm, cblas_dgemm and cblas_cgemm. The pip wheel
 * scipy-openblas32 (a current OpenBLAS that knows new CPUs) exports them only with a
 * `scipy_` prefix, so this library defines the unprefixed names and forwards them to the
 * functions `lavit_blas_bind` is given (scipy_cblas_* of that wheel, or the plain
 * cblas_* of a system OpenBLAS). Loaded with RTLD_GLOBAL before libmlx.so, its
 * definitions are the ones MLX's references resolve to.
 *
 * It also computes skinny products itself: OpenBLAS packs the whole weight matrix even
 * for 1..8 rows, which halves the memory bandwidth of LLM decoding (x @ W.T with a few
 * rows x): ~13 GB/s against ~30 GB/s on a 2-core Xeon. Row-major x (M <= 8 rows) times
 * W^T (W stored (N, K) row-major, as nn.Linear keeps it) streams W once, 4 rows at a
 * time, with the M dot products per row served from cache.
 * Threads: one helper per extra core, sleeping on a condition variable between calls
 * (no spinning: spinning helpers starve MLX's own thread on a busy 2-core machine);
 * blocks of W are handed out dynamically, so a preempted thread does less.
 *
 * Build: cc -O3 -march=native -shared -fPIC -pthread -o liblavit_blas.so blas_shim.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_ROWS = 8, MIN_SIZE = 256, LANES = 16, W_ROWS = 4, CHUNK = 16, MAX_HELPERS = 63 };
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline float total(vec v) { float s = 0; for (int i = 0; i < LANES; ++i) s += v[i]; return s; }

struct job {
  int M, N, K, lda, ldb, ldc, blocks;
  float alpha, beta;
  const float *A, *B;
  float *C;
  atomic_int next;
};

/* C[m, j] = alpha * sum_k A[m, k] * B[j, k] + beta * C[m, j] for the rows j of blocks [first, last) */
static void run_blocks(struct job *job, int first, int last) {
  for (int block = first; block < last; ++block) {
    int j = block * W_ROWS, rows = job->N - j < W_ROWS ? job->N - j : W_ROWS;
    const float *w[W_ROWS];
    for (int r = 0; r < W_ROWS; ++r) w[r] = job->B + (size_t)(j + (r < rows ? r : 0)) * job->ldb;
    vec acc[W_ROWS][MAX_ROWS];
    memset(acc, 0, sizeof acc);
    int k = 0;
    for (; k + LANES <= job->K; k += LANES) {
      vec wk[W_ROWS];
      for (int r = 0; r < W_ROWS; ++r) wk[r] = load(w[r] + k);
      for (int m = 0; m < job->M; ++m) {
        vec a = load(job->A + (size_t)m * job->lda + k);
        for (int r = 0; r < W_ROWS; ++r) acc[r][m] += a * wk[r];
      }
    }
    for (int m = 0; m < job->M; ++m)
      for (int r = 0; r < rows; ++r) {
        float s = total(acc[r][m]);
        for (int t = k; t < job->K; ++t) s += job->A[(size_t)m * job->lda + t] * w[r][t];
        float *c = job->C + (size_t)m * job->ldc + j + r;
        *c = job->alpha * s + (job->beta == 0.0f ? 0.0f : job->beta * *c);
      }
  }
}

static void work(struct job *job) {
  int first;
  while ((first = atomic_fetch_add(&job->next, CHUNK)) < job->blocks)
    run_blocks(job, first, first + CHUNK < job->blocks ? first + CHUNK : job->blocks);
}

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;  /* one skinny product at a time */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static pthread_once_t started = PTHREAD_ONCE_INIT;
static struct job *current;
static unsigned long generation;
static int helpers, busy;

static void *helper(void *unused) {
  (void)unused;
  unsigned long seen = 0;
  for (;;) {
    pthread_mutex_lock(&state_lock);
    while (generation == seen) pthread_cond_wait(&wake, &state_lock);
    seen = generation;
    struct job *job = current;
    pthread_mutex_unlock(&state_lock);
    work(job);
    pthread_mutex_lock(&state_lock);
    if (--busy == 0) pthread_cond_signal(&finished);
    pthread_mutex_unlock(&state_lock);
  }
  return NULL;
}

static void start_helpers(void) {
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int wanted = cores > 1 ? (int)(cores - 1 < MAX_HELPERS ? cores - 1 : MAX_HELPERS) : 0;
  for (int i = 0; i < wanted; ++i) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, helper, NULL) != 0) break;
    pthread_detach(thread);
    ++helpers;
  }
}

static void skinny(struct job *job) {
  pthread_once(&started, start_helpers);
  if (helpers == 0 || pthread_mutex_trylock(&pool_lock) != 0) {  /* no pool, or in use: this thread alone */
    work(job);
    return;
  }
  pthread_mutex_lock(&state_lock);
  current = job;
  busy = helpers;
  ++generation;
  pthread_cond_broadcast(&wake);
  pthread_mutex_unlock(&state_lock);
  work(job);
  pthread_mutex_lock(&state_lock);
  while (busy > 0) pthread_cond_wait(&finished, &state_lock);
  pthread_mutex_unlock(&state_lock);
  pthread_mutex_unlock(&pool_lock);
}

typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int, const double *, int, double,
                         double *, int);
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int, const void *, int,
                         const void *, void *, int);
static atomic_long sgemm_calls;  /* products MLX sent through this library (tests check it) */
static sgemm_fn target_sgemm;
static dgemm_fn target_dgemm;
static cgemm_fn target_cgemm;
static int skinny_enabled = 1;

/* Called once, before MLX is imported, with the fast BLAS's functions. */
int lavit_blas_bind(void *sgemm, void *dgemm, void *cgemm, int skinny_kernel) {
  if (!sgemm || !dgemm || !cgemm) return -1;
  target_sgemm = (sgemm_fn)sgemm;
  target_dgemm = (dgemm_fn)dgemm;
  target_cgemm = (cgemm_fn)cgemm;
  skinny_enabled = skinny_kernel;
  return 0;
}

long lavit_blas_sgemm_calls(void) { return atomic_load(&sgemm_calls); }

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  atomic_fetch_add_explicit(&sgemm_calls, 1, memory_order_relaxed);
  if (skinny_enabled && order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && M >= 1 && M <= MAX_ROWS &&
      N >= MIN_SIZE && K >= MIN_SIZE) {
    struct job job = {M, N, K, lda, ldb, ldc, (N + W_ROWS - 1) / W_ROWS, alpha, beta, A, B, C, 0};
    skinny(&job);
    return;
  }
  target_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(int order, int trans_a, int trans_b, int M, int N, int K, double alpha, const double *A, int lda,
                 const double *B, int ldb, double beta, double *C, int ldc) {
  target_dgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int trans_a, int trans_b, int M, int N, int K, const void *alpha, const void *A, int lda,
                 const void *B, int ldb, const void *beta, void *C, int ldc) {
  target_cgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
