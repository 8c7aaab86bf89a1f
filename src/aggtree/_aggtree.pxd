# _aggtree.pxd - Cython declarations of the aggtree C core's public header
# (aggtree.h): `from aggtree._aggtree cimport ...` in any Cython module.
#
# Only the C contract lives here, readable in one place; see aggtree.h for the
# meaning and cost of each function.  The test hooks (failure injection) are
# declared where they are used, in _testing.pxi, and nowhere else.  The cdef
# classes of the extension (Aggregate, _Tree) are declared in _core.pxd.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "aggtree.h" nogil:
    ctypedef enum agg_status:
        AGG_OK
        AGG_NOMEM
        AGG_DUPLICATE
        AGG_MISSING
        AGG_RANGE
        AGG_INVALID
        AGG_CORRUPT

    ctypedef enum agg_keymode:
        AGG_KEYS_FAST
        AGG_KEYS_GENERAL

    ctypedef struct agg_tail:
        uint32_t refs
        uint32_t len
        uint8_t bytes[1]

    ctypedef struct agg_key:
        uint64_t head
        uint64_t rest

    ctypedef struct agg_tree:
        pass

    int AGG_NODE_SIZE_MIN
    int AGG_NODE_SIZE_MAX
    unsigned int AGG_TAIL_MAX_LEN

    uint64_t agg_f64_to_key(double x)
    double agg_key_to_f64(uint64_t k)
    uint64_t agg_i64_to_key(int64_t x)
    int64_t agg_key_to_i64(uint64_t k)
    void agg_fast_keys(const double *keys, const int64_t *ids, agg_key *out, uint64_t n) nogil
    void agg_advise_huge_pages(void *p, size_t n) nogil
    int agg_key_cmp(agg_keymode mode, agg_key a, agg_key b)
    agg_key agg_key_from_bytes(const uint8_t *e, size_t len, agg_tail *tail_buf)
    agg_key agg_key_from_item_bytes(const uint8_t *e, size_t len, size_t meta,
                                    agg_tail *tail_buf)
    size_t agg_key_to_bytes(agg_key k, uint8_t *out, size_t cap)

    agg_status agg_tree_new(agg_tree **out, uint32_t node_size, agg_keymode mode)
    void agg_tree_free(agg_tree *t)
    uint64_t agg_tree_len(const agg_tree *t)
    agg_keymode agg_tree_mode(const agg_tree *t)
    uint32_t agg_tree_node_size(const agg_tree *t)
    uint32_t agg_tree_depth(const agg_tree *t)
    size_t agg_tree_nbytes(const agg_tree *t)

    agg_status agg_tree_insert(agg_tree *t, agg_key key, double value,
                               int overwrite, int *existed, double *old_value)
    agg_status agg_tree_delete(agg_tree *t, agg_key key, double *old_value)
    agg_status agg_tree_delete_sorted(agg_tree *t, const agg_key *keys, uint64_t n,
                                      uint64_t *bad_index)
    void agg_tree_clear(agg_tree *t)
    agg_status agg_tree_build(agg_tree *t, const agg_key *keys,
                              const double *values, uint64_t n,
                              uint64_t *bad_index)

    agg_status agg_tree_insert_sorted(agg_tree *t, const agg_key *keys,
                                      const double *values, uint64_t n,
                                      uint64_t *bad_index)
    agg_status agg_keys_sort(agg_key *keys, double *values, uint64_t n)
    agg_status agg_tree_build_unsorted(agg_tree *t, agg_key *keys, double *values,
                                       uint64_t n, uint64_t *bad_index)

    int agg_tree_get(const agg_tree *t, agg_key key, double *value)
    uint64_t agg_tree_rank(const agg_tree *t, agg_key key, int after)
    void agg_tree_rank2(const agg_tree *t, agg_key k1, int after1, agg_key k2,
                        int after2, uint64_t *r1, uint64_t *r2)
    agg_status agg_tree_select(const agg_tree *t, uint64_t index,
                               agg_key *key, double *value)
    double agg_tree_sum(const agg_tree *t, uint64_t lo, uint64_t hi)
    uint64_t agg_tree_read(const agg_tree *t, uint64_t index, uint64_t max,
                           int descending, agg_key *keys, double *values)
    void agg_tree_rank_many(const agg_tree *t, const agg_key *keys, uint64_t n,
                            int after, uint64_t *out)

    agg_status agg_tree_check(const agg_tree *t, char *msg, size_t msg_len)
