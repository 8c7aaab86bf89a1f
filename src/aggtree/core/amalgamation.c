/*
 * core/amalgamation.c - the whole aggtree core as one translation unit:
 * every unit #included in order, with AGG_INTERN functions static, so the
 * compiler inlines across units exactly as within one (measured: splitting
 * the core into separately compiled units without this or LTO costs
 * speed in the batch paths).  Readers: start at internal.h.
 */
#define AGG_AMALGAMATION 1
#include "alloc.c"
#include "keys.c"
#include "node.c"
#include "tree.c"
#include "build.c"
#include "threads.c"
#include "batch.c"
#include "batch_insert.c"
#include "batch_delete.c"
#include "sort.c"
#include "check.c"
#include "test_control.c"
