/* Minimal QEMU TCG plugin (plugin API v1, QEMU 7.x): counts executed guest instructions.
 *
 * Debian ships no qemu-plugin.h, so the few API functions used here are declared by hand.
 * Build: gcc -shared -fPIC -O2 -o icount.so icount.c
 * Use:   qemu-aarch64 -cpu cortex-a72 -plugin ./icount.so[,out=FILE][,fork=reset] ./prog
 * At exit the count is written as "icount N" to FILE (a "%p" in FILE becomes the pid, so that
 * forked processes write their own files), else to stderr. With fork=reset a forked child starts
 * counting from zero (its own instructions only) instead of inheriting its parent's count.
 * Counting is per translation block (one callback per executed block, atomic add), so the
 * count is exact and deterministic for a single-threaded program. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
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
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *udata);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
void qemu_plugin_register_vcpu_syscall_ret_cb(qemu_plugin_id_t id, syscall_ret_cb_t cb);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

enum { NR_CLONE = 220, CLONE_VM = 0x100 }; /* aarch64 */
static uint64_t count;
static __thread uint64_t clone_flags;
static char out_path[4096];

static void tb_exec(unsigned int vcpu, void *udata) {
  (void)vcpu;
  __atomic_fetch_add(&count, (uint64_t)(uintptr_t)udata, __ATOMIC_RELAXED);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  (void)id; (void)vcpu; (void)a2; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
  if (num == NR_CLONE) clone_flags = a1;
}

static void on_syscall_ret(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, int64_t ret) {
  (void)id; (void)vcpu;
  if (num == NR_CLONE && ret == 0 && !(clone_flags & CLONE_VM)) /* the child of a fork */
    __atomic_store_n(&count, 0, __ATOMIC_RELAXED);
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
  (void)id; (void)udata;
  uint64_t n = __atomic_load_n(&count, __ATOMIC_RELAXED);
  if (!out_path[0]) { fprintf(stderr, "icount %" PRIu64 "\n", n); return; }
  char path[4200];
  char *pc = strstr(out_path, "%p");
  if (pc) snprintf(path, sizeof path, "%.*s%d%s", (int)(pc - out_path), out_path, (int)getpid(), pc + 2);
  else snprintf(path, sizeof path, "%s", out_path);
  FILE *f = fopen(path, "w");
  if (f) { fprintf(f, "icount %" PRIu64 "\n", n); fclose(f); }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; i++) {
    if (strncmp(argv[i], "out=", 4) == 0) snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
    if (strcmp(argv[i], "fork=reset") == 0) {
      qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
      qemu_plugin_register_vcpu_syscall_ret_cb(id, on_syscall_ret);
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
  qemu_plugin_register_atexit_cb(id, at_exit, NULL);
  return 0;
}
