/* Minimal QEMU TCG plugin (plugin API v1, QEMU 7.x): counts executed guest instructions.
 *
 * Debian ships no qemu-plugin.h, so the few API functions used here are declared by hand.
 * Build: gcc -shared -fPIC -O2 -o icount.so icount.c
 * Use:   qemu-aarch64 -cpu cortex-a72 -plugin ./icount.so[,out=FILE][,fork=reset][,code=A:B] ./prog
 *        qemu-system-arm -M mps2-an500 -plugin ./icount.so[,out=FILE][,mark=ADDR] -kernel firmware.elf
 * At exit the count is written as "icount N" to FILE (a "%p" in FILE becomes the pid, so that
 * forked processes write their own files), else to stderr. With fork=reset a forked child starts
 * counting from zero (its own instructions only) instead of inheriting its parent's count.
 * Counting is per translation block (one callback per executed block, atomic add), so the
 * count is exact and deterministic for a single-threaded program.
 * With code=A:B, a second line "icount_code M" counts only the instructions in executable mappings
 * whose file path contains A or B (found in /proc/self/maps by the host address of a block's code):
 * the instructions of a given library, which stay deterministic in a multi-threaded program whose
 * other threads spin or serve sockets.
 * With mark=ADDR (hexadecimal guest address; bit 0, the Thumb bit of a symbol's address, is ignored), a last
 * line "icount_marks C1 C2 ..." lists the count before each execution of a block that starts at ADDR: the
 * entry of a function (a call target always starts a block), so that the differences between successive
 * marks are the instructions between its calls. Exact for one vCPU (qemu-system-arm's Cortex-M machines). */
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_cb_t)(unsigned int vcpu_index, void *udata);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *udata);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                             uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                             uint64_t a7, uint64_t a8);
typedef void (*syscall_ret_cb_t)(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, int64_t ret);
enum { QEMU_PLUGIN_CB_NO_REGS = 0 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, vcpu_udata_cb_t cb,
                                          int flags, void *udata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
void *qemu_plugin_insn_haddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *udata);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
void qemu_plugin_register_vcpu_syscall_ret_cb(qemu_plugin_id_t id, syscall_ret_cb_t cb);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

enum { NR_CLONE = 220, CLONE_VM = 0x100 }; /* aarch64 */
static uint64_t count, code_count;
static __thread uint64_t clone_flags;
static char out_path[4096], code_paths[1024];
static int marking;
static uint64_t mark_addr, *marks;
static size_t n_marks, marks_size;
static pthread_mutex_t marks_lock = PTHREAD_MUTEX_INITIALIZER;

/* The host address ranges of the mappings in /proc/self/maps; `code` marks the counted ones. */
enum { MAX_RANGES = 8192 };
static struct { uintptr_t lo, hi; int code; } ranges[MAX_RANGES];
static int n_ranges;
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;
static const uint64_t CODE_FLAG = 1ULL << 63;

static int counted_path(const char *path) {
  char patterns[sizeof code_paths];
  snprintf(patterns, sizeof patterns, "%s", code_paths);
  for (char *save, *p = strtok_r(patterns, ":", &save); p; p = strtok_r(NULL, ":", &save))
    if (*p && strstr(path, p)) return 1;
  return 0;
}

static void read_maps(void) {
  FILE *f = fopen("/proc/self/maps", "r");
  char line[4608];
  n_ranges = 0;
  while (f && n_ranges < MAX_RANGES && fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &path_at) < 2) continue;
    line[strcspn(line, "\n")] = 0;
    ranges[n_ranges].lo = lo;
    ranges[n_ranges].hi = hi;
    ranges[n_ranges].code = path_at > 0 && counted_path(line + path_at); /* guest code is mapped r-- */
    n_ranges++;
  }
  if (f) fclose(f);
}

/* 1 if the host address lies in a counted mapping; mappings are re-read when it lies in none known. */
static int in_counted_code(uintptr_t addr) {
  pthread_mutex_lock(&ranges_lock);
  int found = -1;
  for (int pass = 0; pass < 2 && found < 0; pass++) {
    if (pass) read_maps();
    for (int i = 0; i < n_ranges; i++)
      if (addr >= ranges[i].lo && addr < ranges[i].hi) { found = ranges[i].code; break; }
  }
  pthread_mutex_unlock(&ranges_lock);
  return found > 0;
}

static void tb_exec(unsigned int vcpu, void *udata) {
  (void)vcpu;
  uint64_t n = (uint64_t)(uintptr_t)udata;
  __atomic_fetch_add(&count, n & ~CODE_FLAG, __ATOMIC_RELAXED);
  if (n & CODE_FLAG) __atomic_fetch_add(&code_count, n & ~CODE_FLAG, __ATOMIC_RELAXED);
}

/* tb_exec for a block that starts at mark_addr: first records the count so far. */
static void tb_exec_mark(unsigned int vcpu, void *udata) {
  pthread_mutex_lock(&marks_lock);
  if (n_marks == marks_size) {
    marks_size = marks_size ? 2 * marks_size : 1024;
    marks = realloc(marks, marks_size * sizeof *marks);
    if (!marks) { fputs("icount: out of memory for the marks\n", stderr); abort(); }
  }
  marks[n_marks++] = __atomic_load_n(&count, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&marks_lock);
  tb_exec(vcpu, udata);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  uint64_t n = qemu_plugin_tb_n_insns(tb);
  if (code_paths[0] && n && in_counted_code((uintptr_t)qemu_plugin_insn_haddr(qemu_plugin_tb_get_insn(tb, 0))))
    n |= CODE_FLAG;
  int mark = marking && qemu_plugin_tb_vaddr(tb) == mark_addr;
  qemu_plugin_register_vcpu_tb_exec_cb(tb, mark ? tb_exec_mark : tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                       (void *)(uintptr_t)n);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  (void)id; (void)vcpu; (void)a2; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
  if (num == NR_CLONE) clone_flags = a1;
}

static void on_syscall_ret(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, int64_t ret) {
  (void)id; (void)vcpu;
  if (num == NR_CLONE && ret == 0 && !(clone_flags & CLONE_VM)) { /* the child of a fork */
    __atomic_store_n(&count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&code_count, 0, __ATOMIC_RELAXED);
  }
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
  (void)id; (void)udata;
  FILE *f = stderr;
  if (out_path[0]) {
    char path[4200];
    char *pc = strstr(out_path, "%p");
    if (pc) snprintf(path, sizeof path, "%.*s%d%s", (int)(pc - out_path), out_path, (int)getpid(), pc + 2);
    else snprintf(path, sizeof path, "%s", out_path);
    if (!(f = fopen(path, "w"))) return;
  }
  fprintf(f, "icount %" PRIu64 "\n", __atomic_load_n(&count, __ATOMIC_RELAXED));
  if (code_paths[0]) fprintf(f, "icount_code %" PRIu64 "\n", __atomic_load_n(&code_count, __ATOMIC_RELAXED));
  if (marking) {
    pthread_mutex_lock(&marks_lock);
    fputs("icount_marks", f);
    for (size_t i = 0; i < n_marks; i++) fprintf(f, " %" PRIu64, marks[i]);
    fputc('\n', f);
    pthread_mutex_unlock(&marks_lock);
  }
  if (f != stderr) fclose(f);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; i++) {
    if (strncmp(argv[i], "out=", 4) == 0) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    if (strncmp(argv[i], "code=", 5) == 0) snprintf(code_paths, sizeof code_paths, "%s", argv[i] + 5);
    if (strncmp(argv[i], "mark=", 5) == 0) {
      char *end;
      mark_addr = strtoull(argv[i] + 5, &end, 16) & ~1ULL;
      if (end == argv[i] + 5 || *end) {
        fprintf(stderr, "icount: mark=%s is not a hexadecimal address\n", argv[i] + 5);
        return 1;
      }
      marking = 1;
    }
    if (strcmp(argv[i], "fork=reset") == 0) {
      qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
      qemu_plugin_register_vcpu_syscall_ret_cb(id, on_syscall_ret);
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
  qemu_plugin_register_atexit_cb(id, at_exit, NULL);
  return 0;
}
