/* A stand-in for libcuda.so.1, for testing stolon-cuda's safe layer on machines without a GPU.
 *
 * "Device" memory is host memory; streams run everything at once; the three kernels of
 * SELFCHECK_PTX run as C. It is strict where the real driver is: calls that need a current
 * context fail with CUDA_ERROR_INVALID_CONTEXT without one, frees of unknown pointers fail, and
 * a process cannot open its own IPC handles. VMM memory is real shared memory (memfd), so an
 * exported descriptor maps the same bytes elsewhere. mock_* functions let tests count live
 * objects. Environment: STOLON_MOCK_CUDA_DEVICES (default 2; 0 = no device),
 * STOLON_MOCK_CUDA_STUB=1 (cuInit answers like the toolkit's stub library).
 * dma-buf export: device 0 supports it, device 1 does not (attribute 124 is 0 and
 * cuMemGetHandleForAddressRange answers CUDA_ERROR_NOT_SUPPORTED); built with -DMOCK_NO_DMABUF
 * the entry point is missing, as in drivers older than CUDA 11.7.
 *
 * Compiled by tests/mock_driver.rs: cc -shared -fPIC -o libcuda.so.1 mock_libcuda.c -lpthread */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef unsigned int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum {
  OK = 0, INVAL = 1, OOM = 2, NOTINIT = 3, STUB = 34, NODEV = 100, BADDEV = 101,
  BADIMAGE = 200, BADCTX = 201, BADHANDLE = 400, NOTFOUND = 500, NOTREADY = 600,
  PEER_ALREADY = 704, UNSUPPORTED = 801, UNKNOWN = 999
};
#define GRAN (2u << 20)
#define MAXDEV 8
#define MAXOBJ 4096

typedef struct { int type, id; } Loc;
typedef struct {
  unsigned int type, requestedHandleTypes;
  Loc location;
  void *win32;
  unsigned char flags[8];
} Prop;
typedef struct { Loc location; unsigned int flags; } Access;

struct ctx { int dev, refs, peers; };
static struct ctx g_ctx[MAXDEV];
static __thread struct ctx *t_cur;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_init, g_ndev;

enum kind { K_FREE = 0, K_DEV, K_HOST, K_REG, K_STREAM, K_EVENT, K_MODULE, K_FUNC, K_VHANDLE,
            K_VMAP, K_VRES, K_NKINDS };
struct obj {
  int kind, dev, fd, refs, timing, recorded;
  uintptr_t base;
  size_t size;
  unsigned long long id;
  unsigned int handle_types;
  struct ctx *ctx;
  int handle; /* K_VMAP: index of its K_VHANDLE; K_FUNC: which kernel */
  double t;
  char *text;
};
static struct obj g_obj[MAXOBJ];
static unsigned long long g_next_id = 1;

#define LOCK pthread_mutex_lock(&g_mu)
#define UNLOCK pthread_mutex_unlock(&g_mu)
#define NEED_INIT do { if (!g_init) return NOTINIT; } while (0)
#define NEED_CTX do { NEED_INIT; if (!t_cur || t_cur->refs <= 0) return BADCTX; } while (0)

static int new_obj(int kind) {
  for (int i = 0; i < MAXOBJ; i++)
    if (g_obj[i].kind == K_FREE) {
      memset(&g_obj[i], 0, sizeof g_obj[i]);
      g_obj[i].kind = kind;
      g_obj[i].id = g_next_id++;
      g_obj[i].fd = -1;
      return i;
    }
  return -1;
}
static int find_kind(int kind, uintptr_t p) {
  for (int i = 0; i < MAXOBJ; i++)
    if (g_obj[i].kind == kind && p >= g_obj[i].base && p < g_obj[i].base + g_obj[i].size)
      return i;
  return -1;
}
static int find_base(int kind, uintptr_t p) {
  for (int i = 0; i < MAXOBJ; i++)
    if (g_obj[i].kind == kind && g_obj[i].base == p) return i;
  return -1;
}
static int handle_index(CUmemGenericAllocationHandle h) {
  if (h == 0 || h > MAXOBJ || g_obj[h - 1].kind != K_VHANDLE) return -1;
  return (int)h - 1;
}
static void handle_unref(int i) {
  if (--g_obj[i].refs == 0) { close(g_obj[i].fd); g_obj[i].kind = K_FREE; }
}
static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---- test hooks ---- */
int mock_live(int kind) {
  int n = 0;
  LOCK;
  for (int i = 0; i < MAXOBJ; i++) n += g_obj[i].kind == kind;
  UNLOCK;
  return n;
}
int mock_primary_refs(int dev) { return g_ctx[dev].refs; }

/* ---- errors, init, devices ---- */
static const char *err_name(CUresult e) {
  switch (e) {
  case OK: return "CUDA_SUCCESS";
  case INVAL: return "CUDA_ERROR_INVALID_VALUE";
  case OOM: return "CUDA_ERROR_OUT_OF_MEMORY";
  case NOTINIT: return "CUDA_ERROR_NOT_INITIALIZED";
  case STUB: return "CUDA_ERROR_STUB_LIBRARY";
  case NODEV: return "CUDA_ERROR_NO_DEVICE";
  case BADDEV: return "CUDA_ERROR_INVALID_DEVICE";
  case BADIMAGE: return "CUDA_ERROR_INVALID_IMAGE";
  case BADCTX: return "CUDA_ERROR_INVALID_CONTEXT";
  case BADHANDLE: return "CUDA_ERROR_INVALID_HANDLE";
  case NOTFOUND: return "CUDA_ERROR_NOT_FOUND";
  case NOTREADY: return "CUDA_ERROR_NOT_READY";
  case PEER_ALREADY: return "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED";
  case UNSUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
  case UNKNOWN: return "CUDA_ERROR_UNKNOWN";
  default: return NULL;
  }
}
CUresult cuGetErrorName(CUresult e, const char **s) { *s = err_name(e); return *s ? OK : INVAL; }
CUresult cuGetErrorString(CUresult e, const char **s) {
  if (!err_name(e)) { *s = NULL; return INVAL; }
  *s = e == OOM ? "out of memory" : e == BADCTX ? "invalid device context" : "mock error";
  return OK;
}
CUresult cuInit(unsigned int flags) {
  if (flags) return INVAL;
  const char *stub = getenv("STOLON_MOCK_CUDA_STUB");
  if (stub && *stub == '1') return STUB;
  const char *n = getenv("STOLON_MOCK_CUDA_DEVICES");
  g_ndev = n ? atoi(n) : 2;
  if (g_ndev > MAXDEV) g_ndev = MAXDEV;
  if (g_ndev <= 0) return NODEV;
  for (int i = 0; i < g_ndev; i++) g_ctx[i].dev = i;
  g_init = 1;
  return OK;
}
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int *n) { NEED_INIT; *n = g_ndev; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  NEED_INIT;
  if (ordinal < 0 || ordinal >= g_ndev) return BADDEV;
  *d = ordinal;
  return OK;
}
#define NEED_DEV(d) do { NEED_INIT; if ((d) < 0 || (d) >= g_ndev) return BADDEV; } while (0)
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
  NEED_DEV(d);
  snprintf(name, len, "Stolon Mock GPU %d", d);
  return OK;
}
CUresult cuDeviceGetPCIBusId(char *s, int len, CUdevice d) {
  NEED_DEV(d);
  snprintf(s, len, "0000:%02X:00.0", 0x10 + d);
  return OK;
}
CUresult cuDeviceGetAttribute(int *v, unsigned int attr, CUdevice d) {
  NEED_DEV(d);
  switch (attr) {
  case 16: *v = 132; return OK;           /* SMs */
  case 75: *v = 9; return OK;             /* cc major */
  case 76: *v = 0; return OK;             /* cc minor */
  case 19: case 41: case 102: case 103: case 122: *v = 1; return OK;
  case 124: *v = d == 0; return OK;      /* DMA_BUF_SUPPORTED: device 0 only */
  default: if (attr < 150) { *v = 0; return OK; } return INVAL;
  }
}
CUresult cuDeviceTotalMem_v2(size_t *b, CUdevice d) { NEED_DEV(d); *b = 80ull << 30; return OK; }
CUresult cuDeviceCanAccessPeer(int *v, CUdevice a, CUdevice b) {
  NEED_DEV(a); NEED_DEV(b);
  *v = a != b;
  return OK;
}

/* ---- contexts ---- */
CUresult cuDevicePrimaryCtxRetain(void **c, CUdevice d) {
  NEED_DEV(d);
  LOCK; g_ctx[d].refs++; UNLOCK;
  *c = &g_ctx[d];
  return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  NEED_DEV(d);
  LOCK;
  CUresult r = g_ctx[d].refs > 0 ? (g_ctx[d].refs--, OK) : BADCTX;
  UNLOCK;
  return r;
}
CUresult cuCtxSetCurrent(void *c) { NEED_INIT; t_cur = c; return OK; }
CUresult cuCtxGetCurrent(void **c) { NEED_INIT; *c = t_cur; return OK; }
CUresult cuCtxGetDevice(CUdevice *d) { NEED_CTX; *d = t_cur->dev; return OK; }
CUresult cuCtxSynchronize(void) { NEED_CTX; return OK; }
CUresult cuCtxEnablePeerAccess(void *peer, unsigned int flags) {
  NEED_CTX;
  struct ctx *p = peer;
  if (flags || !p || p == t_cur) return INVAL;
  if (t_cur->peers & (1 << p->dev)) return PEER_ALREADY;
  t_cur->peers |= 1 << p->dev;
  return OK;
}
CUresult cuMemGetInfo_v2(size_t *f, size_t *t) { NEED_CTX; *f = 79ull << 30; *t = 80ull << 30; return OK; }

/* ---- memory ---- */
static CUresult add_mem(int kind, void *p, size_t n, int dev) {
  LOCK;
  int i = new_obj(kind);
  if (i >= 0) { g_obj[i].base = (uintptr_t)p; g_obj[i].size = n; g_obj[i].dev = dev; g_obj[i].ctx = t_cur; }
  UNLOCK;
  return i >= 0 ? OK : OOM;
}
static CUresult free_mem(int kind, uintptr_t p, int do_free) {
  LOCK;
  int i = find_base(kind, p);
  if (i >= 0) g_obj[i].kind = K_FREE;
  UNLOCK;
  if (i < 0) return INVAL;
  if (do_free) free((void *)p);
  return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
  NEED_CTX;
  if (n == 0) return INVAL;
  if (n > (1ull << 40)) return OOM;
  /* Page-aligned, as cuMemAlloc's blocks are in practice (dma-buf export needs pages). */
  void *m = aligned_alloc(4096, (n + 4095) & ~(size_t)4095);
  if (!m) return OOM;
  *p = (uintptr_t)m;
  return add_mem(K_DEV, m, n, t_cur->dev);
}
CUresult cuMemFree_v2(CUdeviceptr p) { NEED_CTX; return free_mem(K_DEV, p, 1); }
CUresult cuMemHostAlloc(void **p, size_t n, unsigned int flags) {
  NEED_CTX;
  (void)flags;
  if (n == 0) return INVAL;
  void *m = aligned_alloc(4096, (n + 4095) & ~(size_t)4095);
  if (!m) return OOM;
  memset(m, 0xEE, n); /* garbage, as the real allocation may hold */
  *p = m;
  return add_mem(K_HOST, m, n, t_cur->dev);
}
CUresult cuMemFreeHost(void *p) { NEED_CTX; return free_mem(K_HOST, (uintptr_t)p, 1); }
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned int flags) {
  NEED_CTX;
  (void)flags;
  LOCK;
  int dup = find_kind(K_REG, (uintptr_t)p) >= 0;
  UNLOCK;
  if (dup) return 712;
  return add_mem(K_REG, p, n, t_cur->dev);
}
CUresult cuMemHostUnregister(void *p) { NEED_CTX; return free_mem(K_REG, (uintptr_t)p, 0) ? 713 : OK; }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned int flags) {
  NEED_CTX;
  if (flags) return INVAL;
  LOCK;
  int ok = find_kind(K_HOST, (uintptr_t)p) >= 0 || find_kind(K_REG, (uintptr_t)p) >= 0;
  UNLOCK;
  if (!ok) return INVAL;
  *d = (uintptr_t)p;
  return OK;
}
CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
  NEED_CTX;
  LOCK;
  int i = find_kind(K_DEV, p);
  if (i < 0) i = find_kind(K_VMAP, p);
  if (i >= 0) { if (base) *base = g_obj[i].base; if (size) *size = g_obj[i].size; }
  UNLOCK;
  return i >= 0 ? OK : NOTFOUND;
}
CUresult cuPointerGetAttribute(void *data, unsigned int attr, CUdeviceptr p) {
  NEED_CTX;
  LOCK;
  int i, kind = K_DEV;
  if ((i = find_kind(K_DEV, p)) < 0 && (kind = K_VMAP, i = find_kind(K_VMAP, p)) < 0 &&
      (kind = K_HOST, i = find_kind(K_HOST, p)) < 0 && (kind = K_REG, i = find_kind(K_REG, p)) < 0) {
    UNLOCK;
    return INVAL;
  }
  struct obj o = g_obj[i];
  int res = kind == K_VMAP ? find_kind(K_VRES, p) : -1;
  unsigned int htypes = kind == K_VMAP ? g_obj[o.handle].handle_types : 0;
  int dev = kind == K_VMAP ? g_obj[o.handle].dev : o.dev;
  UNLOCK;
  switch (attr) {
  case 1: *(void **)data = kind == K_VMAP ? NULL : o.ctx; return OK;
  case 2: *(unsigned int *)data = (kind == K_DEV || kind == K_VMAP) ? 2 : 1; return OK;
  case 7: *(unsigned long long *)data = o.id; return OK;
  case 8: *(unsigned int *)data = 0; return OK;
  case 9: *(int *)data = dev; return OK;
  case 10: *(unsigned int *)data = kind == K_DEV; return OK;
  case 11: *(CUdeviceptr *)data = res >= 0 ? g_obj[res].base : o.base; return OK;
  case 12: *(size_t *)data = res >= 0 ? g_obj[res].size : o.size; return OK;
  case 14: *(unsigned long long *)data = htypes; return OK;
  default: return INVAL;
  }
}

CUresult cuMemcpy(CUdeviceptr d, CUdeviceptr s, size_t n) { NEED_CTX; memcpy((void *)d, (void *)s, n); return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *s, size_t n) { return cuMemcpy(d, (uintptr_t)s, n); }
CUresult cuMemcpyDtoH_v2(void *d, CUdeviceptr s, size_t n) { return cuMemcpy((uintptr_t)d, s, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { return cuMemcpy(d, s, n); }
static int stream_ok(void *s) {
  if (!s) return 1;
  LOCK;
  int ok = find_base(K_STREAM, (uintptr_t)s) >= 0;
  UNLOCK;
  return ok;
}
#define NEED_STREAM(s) do { NEED_CTX; if (!stream_ok(s)) return BADHANDLE; } while (0)
CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, void *st) { NEED_STREAM(st); return cuMemcpy(d, s, n); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *s, size_t n, void *st) { NEED_STREAM(st); return cuMemcpy(d, (uintptr_t)s, n); }
CUresult cuMemcpyDtoHAsync_v2(void *d, CUdeviceptr s, size_t n, void *st) { NEED_STREAM(st); return cuMemcpy((uintptr_t)d, s, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void *st) { NEED_STREAM(st); return cuMemcpy(d, s, n); }
CUresult cuMemcpyPeerAsync(CUdeviceptr d, void *dc, CUdeviceptr s, void *sc, size_t n, void *st) {
  NEED_STREAM(st);
  if (!dc || !sc) return BADCTX;
  return cuMemcpy(d, s, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { NEED_CTX; memset((void *)d, v, n); return OK; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void *st) { NEED_STREAM(st); return cuMemsetD8_v2(d, v, n); }

/* ---- IPC: handles name (pid, base); another process could not map malloc memory anyway ---- */
typedef struct { char reserved[64]; } IpcHandle;
CUresult cuIpcGetMemHandle(IpcHandle *h, CUdeviceptr base) {
  NEED_CTX;
  LOCK;
  int i = find_base(K_DEV, base);
  UNLOCK;
  if (i < 0) return INVAL;
  memset(h, 0, sizeof *h);
  memcpy(h->reserved, "MOCKIPC", 7);
  int pid = getpid();
  memcpy(h->reserved + 8, &pid, sizeof pid);
  memcpy(h->reserved + 16, &base, sizeof base);
  return OK;
}
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, IpcHandle h, unsigned int flags) {
  NEED_CTX;
  (void)p;
  if (flags != 1) return INVAL;
  if (memcmp(h.reserved, "MOCKIPC", 7)) return INVAL;
  int pid;
  memcpy(&pid, h.reserved + 8, sizeof pid);
  return pid == getpid() ? BADCTX : UNSUPPORTED;
}
CUresult cuIpcCloseMemHandle(CUdeviceptr p) { NEED_CTX; (void)p; return INVAL; }

/* ---- VMM: memfd-backed allocations mapped into PROT_NONE reservations ---- */
CUresult cuMemGetAllocationGranularity(size_t *g, const Prop *prop, unsigned int flags) {
  NEED_INIT;
  (void)flags;
  if (prop->type != 1 || prop->location.type != 1 || prop->location.id >= g_ndev) return INVAL;
  *g = GRAN;
  return OK;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t n, const Prop *prop, unsigned long long flags) {
  NEED_CTX;
  if (flags || n == 0 || n % GRAN || prop->type != 1 || prop->location.type != 1 ||
      prop->location.id < 0 || prop->location.id >= g_ndev)
    return INVAL;
  int fd = memfd_create("stolon-mock-vmm", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, n)) return OOM;
  LOCK;
  int i = new_obj(K_VHANDLE);
  if (i >= 0) {
    g_obj[i].fd = fd; g_obj[i].size = n; g_obj[i].refs = 1;
    g_obj[i].dev = prop->location.id; g_obj[i].handle_types = prop->requestedHandleTypes;
  }
  UNLOCK;
  if (i < 0) { close(fd); return OOM; }
  *h = i + 1;
  return OK;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
  NEED_INIT;
  LOCK;
  int i = handle_index(h);
  if (i >= 0) handle_unref(i);
  UNLOCK;
  return i >= 0 ? OK : INVAL;
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t n, size_t align, CUdeviceptr addr, unsigned long long flags) {
  NEED_CTX;
  if (flags || addr || n == 0 || n % GRAN) return INVAL;
  if (align < GRAN) align = GRAN;
  uint8_t *m = mmap(NULL, n + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return OOM;
  uintptr_t b = ((uintptr_t)m + align - 1) & ~(uintptr_t)(align - 1);
  if (b > (uintptr_t)m) munmap(m, b - (uintptr_t)m);
  munmap((void *)(b + n), (uintptr_t)m + n + align - (b + n));
  LOCK;
  int i = new_obj(K_VRES);
  if (i >= 0) { g_obj[i].base = b; g_obj[i].size = n; }
  UNLOCK;
  *p = b;
  return OK;
}
static int mapped_in(uintptr_t p, size_t n) {
  for (int i = 0; i < MAXOBJ; i++)
    if (g_obj[i].kind == K_VMAP && g_obj[i].base < p + n && p < g_obj[i].base + g_obj[i].size) return 1;
  return 0;
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t n) {
  NEED_CTX;
  LOCK;
  int i = find_base(K_VRES, p);
  CUresult r = i < 0 || g_obj[i].size != n ? INVAL : mapped_in(p, n) ? INVAL : OK;
  if (r == OK) { g_obj[i].kind = K_FREE; munmap((void *)p, n); }
  UNLOCK;
  return r;
}
CUresult cuMemMap(CUdeviceptr p, size_t n, size_t off, CUmemGenericAllocationHandle h, unsigned long long flags) {
  NEED_CTX;
  LOCK;
  int hi = handle_index(h), ri = find_kind(K_VRES, p);
  CUresult r = OK;
  if (hi < 0 || ri < 0 || flags || off || n == 0 || n > g_obj[hi].size || n % GRAN ||
      p + n > g_obj[ri].base + g_obj[ri].size || mapped_in(p, n))
    r = INVAL;
  else if (mmap((void *)p, n, PROT_NONE, MAP_SHARED | MAP_FIXED, g_obj[hi].fd, 0) == MAP_FAILED)
    r = OOM;
  else {
    int i = new_obj(K_VMAP);
    g_obj[i].base = p; g_obj[i].size = n; g_obj[i].handle = hi;
    g_obj[hi].refs++;
  }
  UNLOCK;
  return r;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t n) {
  NEED_CTX;
  LOCK;
  int i = find_base(K_VMAP, p);
  CUresult r = i < 0 || g_obj[i].size != n ? INVAL : OK;
  if (r == OK) {
    mmap((void *)p, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    g_obj[i].kind = K_FREE;
    handle_unref(g_obj[i].handle);
  }
  UNLOCK;
  return r;
}
CUresult cuMemSetAccess(CUdeviceptr p, size_t n, const Access *desc, size_t count) {
  NEED_CTX;
  if (count == 0 || desc[0].location.type != 1 || desc[0].location.id >= g_ndev) return INVAL;
  LOCK;
  size_t covered = 0;
  for (int i = 0; i < MAXOBJ; i++)
    if (g_obj[i].kind == K_VMAP && g_obj[i].base >= p && g_obj[i].base + g_obj[i].size <= p + n)
      covered += g_obj[i].size;
  UNLOCK;
  if (covered != n) return INVAL;
  return mprotect((void *)p, n, desc[0].flags == 3 ? PROT_READ | PROT_WRITE : PROT_READ) ? INVAL : OK;
}
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr) {
  NEED_INIT;
  LOCK;
  int i = find_kind(K_VMAP, (uintptr_t)addr);
  if (i >= 0) { g_obj[g_obj[i].handle].refs++; *h = g_obj[i].handle + 1; }
  UNLOCK;
  return i >= 0 ? OK : INVAL;
}
CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, unsigned int type, unsigned long long flags) {
  NEED_INIT;
  LOCK;
  int i = handle_index(h);
  CUresult r = i < 0 || flags || type != 1 ? INVAL : !(g_obj[i].handle_types & 1) ? INVAL : OK;
  if (r == OK) *(int *)out = fcntl(g_obj[i].fd, F_DUPFD_CLOEXEC, 3);
  UNLOCK;
  return r;
}
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os, unsigned int type) {
  NEED_INIT;
  int fd = (int)(intptr_t)os;
  struct stat st;
  if (type != 1 || fstat(fd, &st)) return INVAL;
  LOCK;
  int i = new_obj(K_VHANDLE);
  if (i >= 0) {
    g_obj[i].fd = fcntl(fd, F_DUPFD_CLOEXEC, 3); g_obj[i].size = st.st_size; g_obj[i].refs = 1;
    g_obj[i].dev = 0; g_obj[i].handle_types = 1;
    *h = i + 1;
  }
  UNLOCK;
  return i >= 0 ? OK : OOM;
}
CUresult cuMemGetAllocationPropertiesFromHandle(Prop *prop, CUmemGenericAllocationHandle h) {
  NEED_INIT;
  LOCK;
  int i = handle_index(h);
  if (i >= 0) {
    memset(prop, 0, sizeof *prop);
    prop->type = 1; prop->requestedHandleTypes = g_obj[i].handle_types;
    prop->location.type = 1; prop->location.id = g_obj[i].dev;
  }
  UNLOCK;
  return i >= 0 ? OK : INVAL;
}

/* ---- dma-buf export: a memfd of the range's size stands in for the dma-buf ---- */
#ifndef MOCK_NO_DMABUF
CUresult cuMemGetHandleForAddressRange(void *handle, CUdeviceptr p, size_t n, unsigned int type,
                                       unsigned long long flags) {
  NEED_CTX;
  long page = sysconf(_SC_PAGESIZE);
  if (!handle || type != 1 || flags || n == 0 || p % page || n % page) return INVAL;
  LOCK;
  int i = find_kind(K_DEV, p), kind = K_DEV;
  if (i < 0) { i = find_kind(K_VMAP, p); kind = K_VMAP; }
  int dev = i < 0 ? -1 : kind == K_VMAP ? g_obj[g_obj[i].handle].dev : g_obj[i].dev;
  int inside = i >= 0 && p + n <= g_obj[i].base + g_obj[i].size;
  UNLOCK;
  if (!inside) return INVAL;
  if (dev != 0) return UNSUPPORTED;
  int fd = memfd_create("stolon-mock-dmabuf", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, n)) { if (fd >= 0) close(fd); return OOM; }
  *(int *)handle = fd;
  return OK;
}
#endif

/* ---- streams and events: all work runs when queued ---- */
CUresult cuStreamCreate(void **s, unsigned int flags) {
  NEED_CTX;
  (void)flags;
  void *m = malloc(16);
  *s = m;
  return add_mem(K_STREAM, m, 16, t_cur->dev);
}
CUresult cuStreamDestroy_v2(void *s) { NEED_CTX; return free_mem(K_STREAM, (uintptr_t)s, 1); }
CUresult cuStreamSynchronize(void *s) { NEED_STREAM(s); return OK; }
CUresult cuStreamQuery(void *s) { NEED_STREAM(s); return OK; }
static int event_index(void *e) {
  LOCK;
  int i = find_base(K_EVENT, (uintptr_t)e);
  UNLOCK;
  return i;
}
CUresult cuStreamWaitEvent(void *s, void *e, unsigned int flags) {
  NEED_STREAM(s);
  return flags || event_index(e) < 0 ? INVAL : OK;
}
CUresult cuStreamWriteValue64_v2(void *s, CUdeviceptr addr, unsigned long long v, unsigned int flags) {
  NEED_STREAM(s);
  if (flags || addr % 8) return INVAL;
  __atomic_store_n((unsigned long long *)addr, v, __ATOMIC_RELEASE);
  return OK;
}
CUresult cuStreamWaitValue64_v2(void *s, CUdeviceptr addr, unsigned long long v, unsigned int flags) {
  NEED_STREAM(s);
  if (addr % 8 || flags > 3) return INVAL;
  double deadline = now_ms() + 5000;
  for (;;) {
    unsigned long long x = __atomic_load_n((unsigned long long *)addr, __ATOMIC_ACQUIRE);
    int met = flags == 0 ? (long long)(x - v) >= 0 : flags == 1 ? x == v : flags == 2 ? (x & v) != 0 : ~(x | v) != 0;
    if (met) return OK;
    if (now_ms() > deadline) return UNKNOWN; /* a real stream would hang */
    sched_yield();
  }
}
CUresult cuEventCreate(void **e, unsigned int flags) {
  NEED_CTX;
  void *m = malloc(16);
  *e = m;
  CUresult r = add_mem(K_EVENT, m, 16, t_cur->dev);
  int i = event_index(m);
  if (i >= 0) g_obj[i].timing = !(flags & 2);
  return r;
}
CUresult cuEventRecord(void *e, void *s) {
  NEED_STREAM(s);
  int i = event_index(e);
  if (i < 0) return BADHANDLE;
  g_obj[i].t = now_ms(); g_obj[i].recorded = 1;
  return OK;
}
CUresult cuEventQuery(void *e) { NEED_CTX; return event_index(e) < 0 ? BADHANDLE : OK; }
CUresult cuEventSynchronize(void *e) { return cuEventQuery(e); }
CUresult cuEventElapsedTime_v2(float *ms, void *a, void *b) {
  NEED_CTX;
  int i = event_index(a), j = event_index(b);
  if (i < 0 || j < 0 || !g_obj[i].timing || !g_obj[j].timing) return BADHANDLE;
  if (!g_obj[i].recorded || !g_obj[j].recorded) return NOTREADY;
  *ms = (float)(g_obj[j].t - g_obj[i].t);
  return OK;
}
CUresult cuEventDestroy_v2(void *e) { NEED_CTX; return free_mem(K_EVENT, (uintptr_t)e, 1); }

/* ---- modules: PTX text; the three SELFCHECK_PTX kernels run as C ---- */
static const char *KERNELS[] = {"stolon_store_u64", "stolon_wait_then_store", "stolon_fill_u8"};
CUresult cuModuleLoadData(void **m, const void *image) {
  NEED_CTX;
  const char *t = image;
  if (!t || !strstr(t, ".version")) return BADIMAGE;
  char *copy = strdup(t);
  *m = copy;
  CUresult r = add_mem(K_MODULE, copy, 1, t_cur->dev);
  LOCK;
  g_obj[find_base(K_MODULE, (uintptr_t)copy)].text = copy;
  UNLOCK;
  return r;
}
CUresult cuModuleUnload(void *m) { NEED_CTX; return free_mem(K_MODULE, (uintptr_t)m, 1); }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) {
  NEED_CTX;
  LOCK;
  int mi = find_base(K_MODULE, (uintptr_t)m);
  UNLOCK;
  if (mi < 0) return BADHANDLE;
  char pat[256];
  snprintf(pat, sizeof pat, ".entry %s(", name);
  if (!strstr(g_obj[mi].text, pat)) return NOTFOUND;
  for (int k = 0; k < 3; k++)
    if (!strcmp(name, KERNELS[k])) { *f = (void *)&KERNELS[k]; return OK; }
  return NOTFOUND;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shm, void *s, void **params, void **extra) {
  NEED_STREAM(s);
  (void)shm;
  if (!gx || !gy || !gz || !bx || !by || !bz || extra || !params) return INVAL;
  int k = (int)((const char **)f - KERNELS);
  if (k < 0 || k > 2) return BADHANDLE;
  if (k == 0) {
    __atomic_store_n(*(unsigned long long **)params[0], *(unsigned long long *)params[1], __ATOMIC_RELEASE);
  } else if (k == 2) {
    memset(*(void **)params[0], *(unsigned char *)params[2], *(unsigned long long *)params[1]);
  } else {
    unsigned long long *flag = *(unsigned long long **)params[0], target = *(unsigned long long *)params[1];
    double deadline = now_ms() + 5000;
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < target) {
      if (now_ms() > deadline) return UNKNOWN;
      sched_yield();
    }
    __atomic_store_n(*(unsigned long long **)params[2], *(unsigned long long *)params[3], __ATOMIC_RELEASE);
  }
  return OK;
}
