/* A stand-in for libgdrapi (GDRCopy) for tests on machines without a GPU, loaded through
 * $STOLON_LIBGDRAPI next to the mock driver (mock_libcuda.c), whose "device memory" is host
 * memory: a mapping of a pinned range is therefore the range itself. It checks what
 * stolon-cuda asks of it (GPU-page alignment, sizes, pin/map pairing); tests/gpu.rs would run
 * the real library on a GPU host that has the gdrdrv module. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct { unsigned long h; } gdr_mh_t;

#define GPU_PAGE 65536ul
#define SLOTS 64

static int handle_storage;
static int open_handles, live_pins, live_maps;
static struct { unsigned long addr; size_t size; int pinned, mapped; } pin[SLOTS];

void *gdr_open(void) {
  if (getenv("MOCK_GDR_NO_DRIVER")) return NULL; /* no /dev/gdrdrv */
  open_handles++;
  return &handle_storage;
}

int gdr_close(void *g) {
  if (g != &handle_storage || open_handles == 0) return EINVAL;
  open_handles--;
  return 0;
}

int gdr_pin_buffer(void *g, unsigned long addr, size_t size, uint64_t token, uint32_t va_space,
                   gdr_mh_t *h) {
  (void)token;
  (void)va_space;
  if (g != &handle_storage || !h || !size || addr % GPU_PAGE || size % GPU_PAGE) return EINVAL;
  for (int i = 0; i < SLOTS; i++) {
    if (!pin[i].pinned) {
      pin[i].addr = addr;
      pin[i].size = size;
      pin[i].pinned = 1;
      pin[i].mapped = 0;
      h->h = (unsigned long)i + 1;
      live_pins++;
      return 0;
    }
  }
  return ENOMEM;
}

static int slot(gdr_mh_t h) {
  if (h.h == 0 || h.h > SLOTS || !pin[h.h - 1].pinned) return -1;
  return (int)h.h - 1;
}

int gdr_unpin_buffer(void *g, gdr_mh_t h) {
  int i = slot(h);
  if (g != &handle_storage || i < 0 || pin[i].mapped) return EINVAL;
  pin[i].pinned = 0;
  live_pins--;
  return 0;
}

int gdr_map(void *g, gdr_mh_t h, void **va, size_t size) {
  int i = slot(h);
  if (g != &handle_storage || i < 0 || !va || size != pin[i].size || pin[i].mapped) return EINVAL;
  pin[i].mapped = 1;
  live_maps++;
  *va = (void *)pin[i].addr;
  return 0;
}

int gdr_unmap(void *g, gdr_mh_t h, void *va, size_t size) {
  int i = slot(h);
  if (g != &handle_storage || i < 0 || !pin[i].mapped || va != (void *)pin[i].addr ||
      size != pin[i].size)
    return EINVAL;
  pin[i].mapped = 0;
  live_maps--;
  return 0;
}

/* For the tests: live pins * 1000 + live maps * 10 + open handles. */
int mock_gdr_live(void) { return live_pins * 1000 + live_maps * 10 + open_handles; }
