// jomed_fast._C: the candidate packer's C++ path.
//
// What it computes (the inputs, the outputs in OUTPUT_NAMES order and their shapes, the M-RoPE
// numbering, the padded slots, the value checks and their messages) is specified once, in
// jomed_fast/packing.py: its module docstring and pack_candidates_batch_reference, which the tests
// hold this file equal to, field by field and error by error. This file documents how it runs:
//
// * Validation runs once, serially, before any output is allocated; a bad value is a Python
//   ValueError naming the argument. The fill then runs with the GIL released, on OpenMP threads
//   across the B prefixes, then across the B*K rows (kParallelMinElements: small batches on one).
// * Memory: the inputs are made contiguous once (Query::keep) and read through raw pointers; every
//   output is one int64 at::empty tensor that the fill writes exactly once, each (b, k) row only its
//   own slices, through pointers taken before the parallel loops, which never call into ATen. The
//   M-RoPE outputs keep the axis outermost ([3, B, K, L], [3, B, Pm]), so each axis of a row is one
//   contiguous run.
//
// TORCH_VERSION is the release of the torch headers this binary was compiled against:
// jomed_fast/packing.py refuses the binary under another torch (its C++ ABI is not stable).

#include <torch/extension.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#define JOMED_FAST_STR2(x) #x
#define JOMED_FAST_STR(x) JOMED_FAST_STR2(x)

namespace {

using i64 = int64_t;

const std::vector<std::string> kOutputNames = {
    "input_ids",         "attention_mask",     "position_ids",     "mrope_position_ids",
    "rope_deltas",       "answer_position",    "suffix_lengths",   "image_spans",
    "prefix_input_ids",  "prefix_lengths",     "prefix_mrope_position_ids",
    "prefix_rope_deltas", "prefix_image_spans",
};

// Below this many output elements (2 MiB) one thread packs the batch: an OpenMP fork/join costs
// ~10-50 us on an idle machine, but on an oversubscribed one (data-loader workers, other jobs) the
// join waits until every worker has been scheduled, milliseconds; small batches must not pay that.
constexpr i64 kParallelMinElements = 1 << 18;

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw py::value_error(where + ": " + what);
}

// ---------------------------------------------------------------------------------------------
// Inputs: a validated raw-pointer view of one query.
// ---------------------------------------------------------------------------------------------

struct Query {
  std::vector<at::Tensor> keep;  // contiguous tensors the pointers below point into
  const i64* prefix = nullptr;
  i64 P = 0;
  const i64* cand = nullptr;     // [T] the K segments back to back
  const i64* off = nullptr;      // [K + 1] segment k = cand[off[k] : off[k + 1]]
  i64 K = 0;
  const i64* pspan = nullptr;    // [Np, 2] (start, length)
  const i64* pgrid = nullptr;    // [Np, 3] (t, h, w), patch grid before merging
  i64 Np = 0;
  const i64* cspan = nullptr;    // [Nc, 3] (k, start, length), sorted by (k, start)
  const i64* cgrid = nullptr;    // [Nc, 3]
  i64 Nc = 0;
  std::vector<i64> first_span;   // [K + 1] rows [first_span[k], first_span[k + 1]) belong to k

  i64 length(i64 k) const { return off[k + 1] - off[k]; }
};

const i64* data_of(Query& q, const at::Tensor& t) {
  q.keep.push_back(t.contiguous());
  return q.keep.back().data_ptr<i64>();
}

// One image's placeholder span must hold exactly t * (h/m) * (w/m) tokens.
void check_grid(const std::string& where, i64 row, const i64* grid, i64 length, i64 merge) {
  const i64 t = grid[0], h = grid[1], w = grid[2];
  if (t < 1 || h < 1 || w < 1) {
    fail(where, c10::str("expected grid (t, h, w) >= 1, got row ", row, " = (", t, ", ", h, ", ", w, ")"));
  }
  if (h % merge != 0 || w % merge != 0) {
    fail(where, c10::str("expected h and w divisible by spatial_merge_size = ", merge, ", got row ", row,
                         " = (", t, ", ", h, ", ", w, ")"));
  }
  i64 tokens = 0;
  if (__builtin_mul_overflow(t, h / merge, &tokens) || __builtin_mul_overflow(tokens, w / merge, &tokens) ||
      tokens != length) {
    fail(where, c10::str("expected t*h*w/spatial_merge_size^2 = the span's length ", length, ", got row ", row,
                         " = (", t, ", ", h, ", ", w, ") with spatial_merge_size = ", merge));
  }
}

// Spans of one sequence of length n: inside [0, n), length >= 1, sorted, not overlapping.
void check_span(const std::string& where, i64 row, i64 start, i64 length, i64 n, i64 previous_end) {
  if (length < 1 || start < 0 || start > n - length) {
    fail(where, c10::str("expected 0 <= start, 1 <= length, start + length <= ", n, " (the sequence's length), got row ",
                         row, " = (start ", start, ", length ", length, ")"));
  }
  if (start < previous_end) {
    fail(where, c10::str("expected spans sorted by start and not overlapping, got row ", row, " starting at ", start,
                         " before the previous span's end ", previous_end));
  }
}

Query view_query(const std::string& name, const std::vector<at::Tensor>& t, bool mrope, i64 merge) {
  // t = (prefix_ids, prefix_image_spans, prefix_image_grid_thw,
  //      candidate_ids, candidate_offsets, candidate_image_spans, candidate_image_grid_thw);
  // dtypes, ranks and row counts were checked in Python (cheap attribute checks).
  Query q;
  q.keep.reserve(7);
  q.prefix = data_of(q, t[0]);
  q.P = t[0].numel();
  q.pspan = data_of(q, t[1]);
  q.Np = t[1].size(0);
  q.pgrid = data_of(q, t[2]);
  q.cand = data_of(q, t[3]);
  q.off = data_of(q, t[4]);
  q.K = t[4].numel() - 1;
  q.cspan = data_of(q, t[5]);
  q.Nc = t[5].size(0);
  q.cgrid = data_of(q, t[6]);

  const i64 T = t[3].numel();
  if (q.off[0] != 0 || q.off[q.K] != T) {
    fail(name + ".candidate_offsets", c10::str("expected offsets[0] = 0 and offsets[K] = ", T,
                                              " (candidate_ids.numel()), got ", q.off[0], " and ", q.off[q.K]));
  }
  for (i64 k = 0; k < q.K; ++k) {
    if (q.length(k) < 0) {
      fail(name + ".candidate_offsets", c10::str("expected non-decreasing offsets, got offsets[", k + 1, "] = ",
                                                q.off[k + 1], " < offsets[", k, "] = ", q.off[k]));
    }
    if (q.P + q.length(k) < 1) {
      fail(name + ".candidate_offsets",
           c10::str("expected every prefix + segment to hold a token to read the answer at, got an empty segment ", k,
                    " after an empty prefix"));
    }
  }

  i64 end = 0;
  for (i64 r = 0; r < q.Np; ++r) {
    const i64* s = q.pspan + 2 * r;
    check_span(name + ".prefix_image_spans", r, s[0], s[1], q.P, end);
    end = s[0] + s[1];
    if (mrope) check_grid(name + ".prefix_image_grid_thw", r, q.pgrid + 3 * r, s[1], merge);
  }

  q.first_span.assign(q.K + 1, q.Nc);
  i64 k_prev = -1;
  end = 0;
  for (i64 r = 0; r < q.Nc; ++r) {
    const i64* s = q.cspan + 3 * r;
    const i64 k = s[0];
    if (k < k_prev || k >= q.K) {
      fail(name + ".candidate_image_spans",
           c10::str("expected column 0 (candidate) non-decreasing in [0, ", q.K, "), got row ", r, " with candidate ", k,
                    k < k_prev ? c10::str(" after candidate ", k_prev) : std::string()));
    }
    if (k != k_prev) {
      for (i64 j = k_prev + 1; j <= k; ++j) q.first_span[j] = r;
      end = 0;
      k_prev = k;
    }
    check_span(name + ".candidate_image_spans", r, s[1], s[2], q.length(k), end);
    end = s[1] + s[2];
    if (mrope) check_grid(name + ".candidate_image_grid_thw", r, q.cgrid + 3 * r, s[2], merge);
  }
  return q;
}

// ---------------------------------------------------------------------------------------------
// M-RoPE numbering of one sequence (a prefix, or a segment continuing a prefix).
// ---------------------------------------------------------------------------------------------

struct Rope {
  i64 next = 0;  // where the next token starts (HF get_rope_index's current_pos)
  i64 max = -1;  // largest position given so far on any axis
};

// Three axis pointers into an output row.
struct Axes {
  i64* t;
  i64* h;
  i64* w;
};

inline void number_text(i64 begin, i64 end, Rope& rope, Axes out) {
  for (i64 i = begin; i < end; ++i) {
    const i64 p = rope.next + (i - begin);
    out.t[i] = p;
    out.h[i] = p;
    out.w[i] = p;
  }
  if (end > begin) {
    rope.next += end - begin;
    rope.max = std::max(rope.max, rope.next - 1);
  }
}

inline void number_image(i64 begin, const i64* grid, i64 merge, Rope& rope, Axes out) {
  const i64 gt = grid[0], gh = grid[1] / merge, gw = grid[2] / merge;
  i64 i = begin;
  for (i64 a = 0; a < gt; ++a) {
    for (i64 b = 0; b < gh; ++b) {
      for (i64 c = 0; c < gw; ++c, ++i) {
        out.t[i] = rope.next + a;
        out.h[i] = rope.next + b;
        out.w[i] = rope.next + c;
      }
    }
  }
  rope.max = std::max(rope.max, rope.next + std::max({gt, gh, gw}) - 1);
  rope.next += std::max(gh, gw);
}

// Numbers tokens [0, n) whose images are `count` rows of (start, length) at `spans` (row stride
// `stride`) with grids at `grids`; then the padded slots [n, width) continue as text.
void number_sequence(i64 n, i64 width, const i64* spans, i64 stride, const i64* grids, i64 count, i64 merge,
                     Rope& rope, Axes out) {
  i64 cursor = 0;
  for (i64 r = 0; r < count; ++r) {
    const i64 start = spans[r * stride], length = spans[r * stride + 1];
    number_text(cursor, start, rope, out);
    number_image(start, grids + 3 * r, merge, rope, out);
    cursor = start + length;
  }
  number_text(cursor, n, rope, out);
  for (i64 i = n; i < width; ++i) {
    const i64 p = rope.next + (i - n);
    out.t[i] = p;
    out.h[i] = p;
    out.w[i] = p;
  }
}

// ---------------------------------------------------------------------------------------------
// The packer.
// ---------------------------------------------------------------------------------------------

struct Sizes {
  i64 B, K, L, Pm, Nc, Np;
  std::vector<i64> image_base;   // [B + 1] first global candidate-image index of query b
  std::vector<i64> pimage_base;  // [B + 1] first global prefix-image index of query b
};

Sizes batch_sizes(const std::vector<Query>& queries, const std::string& name) {
  Sizes s{static_cast<i64>(queries.size()), queries.empty() ? 0 : queries[0].K, 0, 0, 0, 0, {0}, {0}};
  for (i64 b = 0; b < s.B; ++b) {
    const Query& q = queries[b];
    if (q.K != s.K) {
      fail(c10::str(name, "[", b, "].candidate_offsets"),
           c10::str("expected the same number of candidates K = ", s.K, " as ", name, "[0], got K = ", q.K));
    }
    for (i64 k = 0; k < q.K; ++k) s.L = std::max(s.L, q.length(k));
    s.Pm = std::max(s.Pm, q.P);
    s.image_base.push_back(s.image_base.back() + q.Nc);
    s.pimage_base.push_back(s.pimage_base.back() + q.Np);
  }
  s.Nc = s.image_base.back();
  s.Np = s.pimage_base.back();
  return s;
}

struct Outputs {
  at::Tensor input_ids, attention_mask, position_ids, mrope, rope_deltas, answer_position, suffix_lengths,
      image_spans, prefix_input_ids, prefix_lengths, prefix_mrope, prefix_rope_deltas, prefix_image_spans;

  Outputs(const Sizes& s, bool mrope_on) {
    const auto opt = at::TensorOptions().dtype(at::kLong);
    input_ids = at::empty({s.B, s.K, s.L}, opt);
    attention_mask = at::empty({s.B, s.K, s.Pm + s.L}, opt);
    position_ids = at::empty({s.B, s.K, s.L}, opt);
    answer_position = at::empty({s.B, s.K}, opt);
    suffix_lengths = at::empty({s.B, s.K}, opt);
    image_spans = at::empty({s.Nc, 5}, opt);
    prefix_input_ids = at::empty({s.B, s.Pm}, opt);
    prefix_lengths = at::empty({s.B}, opt);
    prefix_image_spans = at::empty({s.Np, 4}, opt);
    if (mrope_on) {
      mrope = at::empty({3, s.B, s.K, s.L}, opt);
      rope_deltas = at::empty({s.B, s.K}, opt);
      prefix_mrope = at::empty({3, s.B, s.Pm}, opt);
      prefix_rope_deltas = at::empty({s.B}, opt);
    }
  }

  // Raw pointers, taken once here so that the parallel fill never calls into ATen.
  struct Ptrs {
    i64 *input_ids, *attention_mask, *position_ids, *mrope, *rope_deltas, *answer_position, *suffix_lengths,
        *image_spans, *prefix_input_ids, *prefix_lengths, *prefix_mrope, *prefix_rope_deltas, *prefix_image_spans;
  };

  static i64* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<i64>() : nullptr; }

  Ptrs ptrs() const {
    return {ptr(input_ids),        ptr(attention_mask), ptr(position_ids),     ptr(mrope),
            ptr(rope_deltas),      ptr(answer_position), ptr(suffix_lengths),  ptr(image_spans),
            ptr(prefix_input_ids), ptr(prefix_lengths), ptr(prefix_mrope),     ptr(prefix_rope_deltas),
            ptr(prefix_image_spans)};
  }

  std::vector<at::Tensor> list() const {
    return {input_ids,        attention_mask, position_ids, mrope,        rope_deltas,        answer_position,
            suffix_lengths,   image_spans,    prefix_input_ids, prefix_lengths, prefix_mrope, prefix_rope_deltas,
            prefix_image_spans};
  }
};

// The prefix of query b: padded ids, its M-RoPE numbering, its state for the suffixes, its images.
void pack_prefix(const Query& q, i64 b, const Sizes& s, i64 pad, i64 merge, bool mrope_on,
                 const Outputs::Ptrs& o, Rope& state) {
  i64* ids = o.prefix_input_ids + b * s.Pm;
  std::memcpy(ids, q.prefix, sizeof(i64) * q.P);
  std::fill(ids + q.P, ids + s.Pm, pad);
  o.prefix_lengths[b] = q.P;

  i64* table = o.prefix_image_spans + 4 * s.pimage_base[b];
  for (i64 r = 0; r < q.Np; ++r) {
    i64* row = table + 4 * r;
    row[0] = b;
    row[1] = q.pspan[2 * r];
    row[2] = q.pspan[2 * r + 1];
    row[3] = s.pimage_base[b] + r;
  }

  if (!mrope_on) return;
  const i64 axis = s.B * s.Pm;
  i64* base = o.prefix_mrope + b * s.Pm;
  number_sequence(q.P, s.Pm, q.pspan, 2, q.pgrid, q.Np, merge, state, Axes{base, base + axis, base + 2 * axis});
  o.prefix_rope_deltas[b] = state.max + 1 - q.P;
}

// Row (b, k): the padded segment, its mask over prefix + suffix, 1-D and 3-D positions.
void pack_row(const Query& q, i64 b, i64 k, const Sizes& s, i64 pad, i64 merge, bool mrope_on, Rope prefix_state,
              const Outputs::Ptrs& o) {
  const i64 row = b * s.K + k;
  const i64 n = q.length(k);
  const i64* seg = q.cand + q.off[k];

  i64* ids = o.input_ids + row * s.L;
  std::memcpy(ids, seg, sizeof(i64) * n);
  std::fill(ids + n, ids + s.L, pad);

  i64* mask = o.attention_mask + row * (s.Pm + s.L);
  std::fill(mask, mask + q.P, i64{1});
  std::fill(mask + q.P, mask + s.Pm, i64{0});
  std::fill(mask + s.Pm, mask + s.Pm + n, i64{1});
  std::fill(mask + s.Pm + n, mask + s.Pm + s.L, i64{0});

  i64* pos = o.position_ids + row * s.L;
  for (i64 i = 0; i < s.L; ++i) pos[i] = q.P + i;

  o.answer_position[row] = n - 1;
  o.suffix_lengths[row] = n;

  const i64 r0 = q.first_span[k], r1 = q.first_span[k + 1];
  i64* table = o.image_spans + 5 * (s.image_base[b] + r0);
  for (i64 r = r0; r < r1; ++r, table += 5) {
    table[0] = b;
    table[1] = k;
    table[2] = q.cspan[3 * r + 1];
    table[3] = q.cspan[3 * r + 2];
    table[4] = s.image_base[b] + r;
  }

  if (!mrope_on) return;
  const i64 axis = s.B * s.K * s.L;
  i64* base = o.mrope + row * s.L;
  Rope rope = prefix_state;
  number_sequence(n, s.L, q.cspan + 3 * r0 + 1, 3, q.cgrid + 3 * r0, r1 - r0, merge, rope,
                  Axes{base, base + axis, base + 2 * axis});
  o.rope_deltas[row] = rope.max + 1 - (q.P + n);
}

int threads_for(i64 work_items, i64 elements, i64 num_threads) {
  if (num_threads <= 1 || work_items <= 1 || elements < kParallelMinElements) return 1;
  return static_cast<int>(std::min(num_threads, work_items));
}

std::vector<at::Tensor> pack_batch(const std::vector<std::vector<at::Tensor>>& inputs, i64 pad_token_id,
                                   i64 spatial_merge_size, bool mrope, i64 num_threads, const std::string& name) {
  if (spatial_merge_size < 1) {
    fail("spatial_merge_size", c10::str("expected an integer >= 1, got ", spatial_merge_size));
  }
  if (inputs.empty()) fail(name, "expected at least one query, got none");

  std::vector<Query> queries;
  queries.reserve(inputs.size());
  for (size_t b = 0; b < inputs.size(); ++b) {
    if (inputs[b].size() != 7) fail(name, "internal: expected 7 tensors per query");
    queries.push_back(view_query(c10::str(name, "[", b, "]"), inputs[b], mrope, spatial_merge_size));
  }
  const Sizes s = batch_sizes(queries, name);

  py::gil_scoped_release no_gil;
  const Outputs out(s, mrope);
  const Outputs::Ptrs o = out.ptrs();
  std::vector<Rope> prefix_state(s.B);
  const i64 threads = num_threads > 0 ? num_threads : at::get_num_threads();

  const int prefix_threads = threads_for(s.B, s.B * s.Pm * (mrope ? 4 : 1), threads);
#pragma omp parallel for schedule(static) num_threads(prefix_threads) if (prefix_threads > 1)
  for (i64 b = 0; b < s.B; ++b) {
    pack_prefix(queries[b], b, s, pad_token_id, spatial_merge_size, mrope, o, prefix_state[b]);
  }

  const i64 rows = s.B * s.K;
  const int row_threads = threads_for(rows, rows * (s.Pm + s.L * (mrope ? 5 : 2)), threads);
#pragma omp parallel for schedule(static) num_threads(row_threads) if (row_threads > 1)
  for (i64 row = 0; row < rows; ++row) {
    const i64 b = row / s.K, k = row % s.K;
    pack_row(queries[b], b, k, s, pad_token_id, spatial_merge_size, mrope, prefix_state[b], o);
  }
  return out.list();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "jomed_fast C++ extension: the candidate packer (see jomed_fast/packing.py).";
  m.attr("OUTPUT_NAMES") = kOutputNames;
  m.attr("TORCH_VERSION") = JOMED_FAST_STR(TORCH_VERSION_MAJOR) "." JOMED_FAST_STR(TORCH_VERSION_MINOR) "."
      JOMED_FAST_STR(TORCH_VERSION_PATCH);
  m.def("pack_batch", &pack_batch, py::arg("inputs"), py::arg("pad_token_id"), py::arg("spatial_merge_size"),
        py::arg("mrope"), py::arg("num_threads"), py::arg("name"),
        "Packs B queries; inputs[b] = (prefix_ids, prefix_image_spans, prefix_image_grid_thw, candidate_ids, "
        "candidate_offsets, candidate_image_spans, candidate_image_grid_thw). Returns the tensors named by "
        "OUTPUT_NAMES (undefined -> None when mrope is false).");
}
