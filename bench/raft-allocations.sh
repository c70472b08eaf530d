#!/usr/bin/env bash
# Heap allocations per committed entry of the Raft core. Builds a tiny LD_PRELOAD counter of
# malloc/calloc/realloc/posix_memalign/aligned_alloc calls (valgrind 3.19 cannot read Swift's
# DWARF 5), runs `keel bench raft` with two entry counts and divides the difference in
# allocations by the difference in entries, so start-up allocations cancel out.
# BATCH=N sets proposals per batch (default 64). Needs gcc and a release build: swift build -c release.
set -euo pipefail
keel=${1:-.build/release/keel}
small=${2:-20000}
large=${3:-120000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/count.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static atomic_long allocations;
static char bootstrap[4096];
static size_t bootstrap_used;
static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static int resolving;
static void resolve(void) {
    if (real_malloc || resolving) return;
    resolving = 1;
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    resolving = 0;
}
void *malloc(size_t n) { resolve(); allocations++; return real_malloc(n); }
void *calloc(size_t a, size_t b) {
    if (!real_calloc) { /* dlsym itself may call calloc */
        void *p = bootstrap + bootstrap_used; bootstrap_used += (a * b + 15) & ~15UL; memset(p, 0, a * b); return p;
    }
    allocations++; return real_calloc(a, b);
}
void *realloc(void *p, size_t n) { resolve(); allocations++; return real_realloc(p, n); }
int posix_memalign(void **p, size_t a, size_t n) { resolve(); allocations++; return real_posix_memalign(p, a, n); }
void *aligned_alloc(size_t a, size_t n) { resolve(); allocations++; return real_aligned_alloc(a, n); }
void free(void *p) {
    static void (*real_free)(void *);
    if ((char *)p >= bootstrap && (char *)p < bootstrap + sizeof bootstrap) return;
    if (!real_free) real_free = dlsym(RTLD_NEXT, "free");
    real_free(p);
}
__attribute__((destructor)) static void report(void) { fprintf(stderr, "heap allocations: %ld\n", (long)allocations); }
C
gcc -O2 -shared -fPIC -o "$work/count.so" "$work/count.c" -ldl
allocs() { LD_PRELOAD="$work/count.so" "$keel" bench raft --entries "$1" --batch "${BATCH:-64}" 2>&1 >/dev/null | sed -n 's/heap allocations: //p' | tail -1; }
a=$(allocs "$small")
b=$(allocs "$large")
echo "heap allocations: $a for $small entries, $b for $large entries"
echo "per committed entry (3 nodes in one process, every allocation counted): $(( (b - a) / (large - small) ))"
