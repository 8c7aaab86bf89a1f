"""The mutants of the mutation check (tests/mutation/run.py): small planted bugs in the C core.

Each mutant is a dict:
  id          short name (M01, ...), used by --only
  section     the section of the core's design essay (the essays atop core/*.c) it hits
  bug         one line: what the planted bug does
  find        exact text that must occur exactly once across src/aggtree/**/*.c and
              *.h (a logic line, not a comment or a function name, so that it
              survives the core being split into several files)
  replace     the text put in its place
  equivalent  (optional) why the mutant changes no observable behaviour; such a
              mutant is expected to survive, and run.py flags it if it is caught

Several bugs are guarded by a size (``> 4096``) so that they fire only in
subtrees larger than the small trees most tests build: the kind of bug the
exact reads at scale (tests/api/test_scale.py, tests/c/test_scale.c) exist for.
"""

MUTANTS = [
    # ---- 3. keys -----------------------------------------------------------
    {
        "id": "M01",
        "section": "3 keys",
        "bug": "FAST key_lt is <= (the 128-bit compare is inclusive): lower bounds count equal keys",
        "find": "    return x < y;\n}",
        "replace": "    return x <= y;\n}",
    },
    {
        "id": "M02",
        "section": "3 keys",
        "bug": "float key image: negative floats keep their magnitude order (sign bit cleared instead of all bits flipped)",
        "find": "return (b >> 63) ? ~b : (b | (UINT64_C(1) << 63));",
        "replace": "return (b >> 63) ? (b & ~(UINT64_C(1) << 63)) : (b | (UINT64_C(1) << 63));",
    },
    {
        "id": "M03",
        "section": "3 keys",
        "bug": "GENERAL upper bound among keys whose 8-byte heads tie uses < instead of <=",
        "find": "if (le ? c <= 0 : c < 0)",
        "replace": "if (le ? c < 0 : c < 0)",
    },
    # ---- 2/5. node primitives -----------------------------------------------
    {
        "id": "M04",
        "section": "2 node primitives",
        "bug": "inner_shift moves every entry array but the exact flags",
        "find": "    memmove(inner_ex(t, n) + to, inner_ex(t, n) + from, (size_t)k);\n",
        "replace": "",
    },
    # ---- 6. insert -----------------------------------------------------------
    {
        "id": "M05",
        "section": "6 insert",
        "bug": "skipped summary refresh: after a 2-to-3 leaf split the third leaf's entry is not recomputed",
        "find": "inner_set_sep(t, p, b + 1, node_keys(grp[2])[0]);\n                inner_refresh(t, p, b + 1);",
        "replace": "inner_set_sep(t, p, b + 1, node_keys(grp[2])[0]);",
    },
    {
        "id": "M06",
        "section": "6 insert",
        "bug": "overflow into a sibling moves the moved values' high parts but drops their low parts (dropped sum term)",
        "find": "x1[n1++] = mv.dir * mv.lo;",
        "replace": "(void)0;",
    },
    {
        "id": "M07",
        "section": "6 insert",
        "bug": "plain insert adds 1 to the path sums of subtrees holding more than 4096 items (guarded)",
        "find": "inner_bump1(t, path[d], idx[d], 1, value);",
        "replace": "inner_bump1(t, path[d], idx[d], 1, value + (inner_cnt(t, path[d])[idx[d]] > 4096 ? 1.0 : 0.0));",
    },
    # ---- 7. delete -----------------------------------------------------------
    {
        "id": "M08",
        "section": "7 delete",
        "bug": "merging two leaves does not fix the prev pointer of the leaf after them",
        "find": "            if (r->next)\n                r->next->prev = l;\n",
        "replace": "",
    },
    {
        "id": "M09",
        "section": "7 delete",
        "bug": "two siblings holding exactly cap entries are evened out instead of merged (< for <=)",
        "find": "if (total <= t->cap) {",
        "replace": "if (total < t->cap) {",
        "equivalent": "both outcomes are valid trees (each sibling keeps >= cap/2 = min entries, I4): every read, "
                      "sum and the checker agree; only the shape and nbytes (one node more stays live) differ, "
                      "and neither is specified",
    },
    # ---- 5/8. counts and sums: rank, rank2, select, sum, read -----------------
    {
        "id": "M10",
        "section": "8 rank",
        "bug": "count prefix summed from the far end is one short in nodes holding more than 4096 items (guarded)",
        "find": "    return total - s;\n",
        "replace": "    return total - s - (total > 4096);\n",
    },
    {
        "id": "M11",
        "section": "8 rank2 lockstep",
        "bug": "rank2: the second path takes its node total from the first path's node",
        "find": "tb = inner_cnt(t, b)[j];",
        "replace": "tb = inner_cnt(t, a)[j < a->count ? j : 0];",
    },
    {
        "id": "M12",
        "section": "8 rank2 lockstep",
        "bug": "rank2: the second bound uses the first bound's inclusive/after flag",
        "find": "*r2 = rb + (after2 ? leaf_count_le(t, b, k2) : leaf_count_lt(t, b, k2));",
        "replace": "*r2 = rb + (after1 ? leaf_count_le(t, b, k2) : leaf_count_lt(t, b, k2));",
    },
    {
        "id": "M13",
        "section": "8 select",
        "bug": "select scans from the front up to the middle inclusive (<= for <) - both scans are correct",
        "find": "if (2 * index < total) {",
        "replace": "if (2 * index <= total) {",
        "equivalent": "leaf_at picks the same child from either end (the front scan is valid for every index, "
                      "the back scan for every index < total); only which end is scanned changes at the exact middle",
    },
    {
        "id": "M14",
        "section": "8 sum",
        "bug": "sum of a range: the children right of the left boundary's path are skipped once (dropped sum term)",
        "find": "for (k = j + 1; k < n->count; k++)",
        "replace": "for (k = j + 2; k < n->count; k++)",
    },
    {
        "id": "M15",
        "section": "8 sum",
        "bug": "sum of a range adds whole children's high parts only, not their low parts",
        "find": "    a->lo += inner_lo(t, n)[j];\n",
        "replace": "",
    },
    {
        "id": "M16",
        "section": "5 rank_many",
        "bug": "rank_many: moving on to the next leaf does not add the previous leaf's count to the base",
        "find": "            base += leaf->count;\n",
        "replace": "",
    },
    # ---- 9. bulk build -------------------------------------------------------
    {
        "id": "M17",
        "section": "9 bulk build",
        "bug": "pack_span (core/tree.c): when one entry is left for the last node of a full-packed level, "
               "the last two nodes become [.., cap - 1, 1] instead of [.., cap - 1, 2] (one entry lost)",
        "find": "*base = i * cap - 1;\n                *size = 2;",
        "replace": "*base = i * cap - 1;\n                *size = 1;",
    },
    # ---- 10. allocation ------------------------------------------------------
    {
        "id": "M18",
        "section": "10 allocation",
        "bug": "node pool allocations ignore the failure injector",
        "find": "    if (injected_failure())\n        return NULL;\n    if (pl->free) {",
        "replace": "    if (pl->free) {",
    },
    # ---- 11. checker ---------------------------------------------------------
    {
        "id": "M19",
        "section": "11 checker",
        "bug": "checker accepts a separator equal to the largest key of the child on its left (I2, < made <=)",
        "find": "if (!(key_cmp(t, prev_max, sep[i]) < 0))",
        "replace": "if (!(key_cmp(t, prev_max, sep[i]) <= 0))",
    },
    # ---- 13. batch insert ----------------------------------------------------
    {
        "id": "M20",
        "section": "13 batch insert",
        "bug": "missed carry: the items carried in from the left neighbour are left out of the leaf's sum delta",
        "find": "if (c)\n        dds_add(&delta, cs->csum.hi, cs->csum.lo, cs->csum.exact, 0);",
        "replace": "if (0)\n        dds_add(&delta, cs->csum.hi, cs->csum.lo, cs->csum.exact, 0);",
    },
    {
        "id": "M21",
        "section": "13 batch insert",
        "bug": "skipped separator update: a leaf that received a carry keeps its old separator",
        "find": "if ((c || op->spill) && op->j > 0)",
        "replace": "if (op->spill && op->j > 0)",
    },
    {
        "id": "M22",
        "section": "13 batch insert",
        "bug": "apply pass: a path node that gained more than 4096 items passes one fewer up (guarded missed carry)",
        "find": "b->dcnt[lev - 1] += b->dcnt[lev];",
        "replace": "b->dcnt[lev - 1] += b->dcnt[lev] - (b->dcnt[lev] > 4096);",
    },
    # ---- 13. batch delete ----------------------------------------------------
    {
        "id": "M23",
        "section": "13 batch delete",
        "bug": "FAST batch delete: the first key removed from each leaf is left out of the removed sum",
        "find": "dds_add(&gone, lv[r], 0.0, 1, 0);\n            q++;",
        "replace": "if (q != i)\n                dds_add(&gone, lv[r], 0.0, 1, 0);\n            q++;",
    },
    # ---- 14. sort ------------------------------------------------------------
    {
        "id": "M24",
        "section": "14 sort",
        "bug": "insertion sort of small inputs never moves a key (and value) to position 0",
        "find": "for (j = i; j > 0 && ksort_lt(x, k[j - 1]); j--) {",
        "replace": "for (j = i; j > 1 && ksort_lt(x, k[j - 1]); j--) {",
    },
    # ---- threads (sections 13, 14) -------------------------------------------
    {
        "id": "M25",
        "section": "threads",
        "bug": "run_parts (core/threads.c), the two-thread runner of the batch insert check (and, since "
               "the split, of the batch delete check): the helper thread's result (a duplicate / a missing "
               "key it found) is dropped",
        "find": "return r0 < r.helper_res ? r0 : r.helper_res;",
        "replace": "return r0;",
    },
    {
        "id": "M26",
        "section": "threads",
        "bug": "two-part batch delete check reports a missing key of the second half at its index within the half",
        "find": "*bad_index = c.bad[p] + (p ? c.cut : 0);",
        "replace": "*bad_index = c.bad[p];",
    },
    # ---- 9. bulk build on two threads, and the snapshot's two halves ---------
    {
        "id": "M27",
        "section": "9 bulk build",
        "bug": "agg_build_put_keys (core/build.c): the order check skips each leaf's first item "
               "against the item before it (the check across leaves inside a put range)",
        "find": "for (at = li > l0 ? 0 : 1; at < sz; at++)",
        "replace": "for (at = 1; at < sz; at++)",
    },
    {
        "id": "M28",
        "section": "9 bulk build",
        "bug": "agg_tree_build: a level-1 separator is its child's second key instead of its first",
        "find": "s = l == 1 ? node_keys(c)[0] : node_min_key(t, c);",
        "replace": "s = l == 1 ? node_keys(c)[c->count > 1] : node_min_key(t, c);",
    },
    {
        "id": "M29",
        "section": "snapshot.c",
        "bug": "the two-half item check of a numeric section reports the helper's bad item whenever it "
               "found one, even when the caller's half holds an earlier one",
        "find": "const check_part *first = a.bad >= 0 ? &a : &b;",
        "replace": "const check_part *first = b.bad >= 0 ? &b : &a;",
    },
    {
        "id": "M30",
        "section": "snapshot.c",
        "bug": "crc32_combine shifts the second half's CRC instead of the first's",
        "find": "return gf2_mulmod(r, crc1) ^ crc2;",
        "replace": "return gf2_mulmod(r, crc2) ^ crc1;",
    },
    # ---- 9. staged build, snapshot_read.c (2026-12-07, third session) -------
    {
        "id": "M31",
        "section": "9 bulk build",
        "bug": "agg_build_finish skips the order check across the edges of two put ranges",
        "find": "if (li > 0 && !(d & DONE_EDGE) &&",
        "replace": "if (0 && li > 0 && !(d & DONE_EDGE) &&",
    },
    {
        "id": "M32",
        "section": "9 bulk build",
        "bug": "leaf_parent ignores the irregular end of level 1 ([.., cap - 1, 2]): the last two leaves "
               "land in the wrong parent slots",
        "find": "if (s1 > 1 && s0 - (s1 - 1) * cap == 1 && li + 2 >= s0) {",
        "replace": "if (0) {",
    },
    {
        "id": "M33",
        "section": "9 bulk build",
        "bug": "the vectorised leaf sums never clear the exact flag (an inexact leaf sum is flagged exact)",
        "find": "inexact |= (f != 0.0);",
        "replace": "(void)f;",
    },
    {
        "id": "M34",
        "section": "snapshot_read.c",
        "bug": "a section read from a file skips the key image check of its chunks",
        "find": "} else if (agg_snapshot_check_items((const uint64_t *)buf, NULL, i1 - i0, h->kind,",
        "replace": "} else if (0 && agg_snapshot_check_items((const uint64_t *)buf, NULL, i1 - i0, h->kind,",
    },
    {
        "id": "M35",
        "section": "snapshot_read.c",
        "bug": "the two halves' value checksums are XORed instead of combined",
        "find": "h[0].crc_v = agg_snapshot_crc32_combine(h[0].crc_v, h[1].crc_v, 8 * (n - mid));",
        "replace": "h[0].crc_v = h[0].crc_v ^ h[1].crc_v;",
    },
]
