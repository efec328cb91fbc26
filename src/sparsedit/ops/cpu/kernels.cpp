// sparsedit's compiled CPU kernels: the tile gather with its prologue fused in, and the tile scatter with its residual
// add fused in. One pass over the tiles each, parallel over tile rows with torch's own thread pool, vectorised with
// ATen's `Vectorized` (the same SIMD code and Sleef functions torch's own elementwise kernels use, so the prologue's
// arithmetic matches torch's op for op). The plain-PyTorch reference (`sparsedit/ops/reference`) is the oracle these
// are tested against, and `sparsedit/ops/cpu/__init__.py` builds this file and decides which calls it takes.
//
// Layout: feature maps are channels-last ([B, H, W, C] in memory), tiles are returned as [N, th, tw, C].

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

// Large outputs (gathered tiles, undo copies) come from a small pool of buffers that no tensor references any more.
// A fresh allocation of tens of MB is a fresh mmap whose every page faults on first touch: a 61 MB gather measured
// 24 ms, of which 18 ms were page faults (2.9 ms to write into memory already touched). A buffer is taken only when
// the pool holds its storage's sole reference (every tensor made from it is gone), under the pool's lock; the pool
// keeps at most `pool_limit()` bytes (SPARSEDIT_OPS_POOL_MB, default 1024; 0 turns it off), dropping the least
// recently used buffers first.
constexpr int64_t kPoolMinBytes = 1 << 20;

int64_t pool_limit() {
  static const int64_t limit = [] {
    const char* env = std::getenv("SPARSEDIT_OPS_POOL_MB");
    return (env != nullptr ? std::atoll(env) : int64_t{1024}) << 20;
  }();
  return limit;
}

std::mutex pool_mutex;
std::vector<at::Tensor> pool;  // flat float32 buffers, least recently used first

at::Tensor pooled_empty(at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const int64_t bytes = numel * static_cast<int64_t>(sizeof(float));
  if (bytes < kPoolMinBytes || bytes > pool_limit()) return at::empty(sizes, options);
  std::lock_guard<std::mutex> lock(pool_mutex);
  for (size_t i = 0; i < pool.size(); ++i) {
    at::Tensor& b = pool[i];
    // (an inference tensor made under `torch.inference_mode` must not come back outside it, where writing into it
    // in place is an error, nor a normal one inside it)
    if (b.storage().use_count() == 1 && b.numel() >= numel && b.numel() <= 2 * numel &&
        b.is_inference() == c10::InferenceMode::is_enabled()) {
      at::Tensor buf = b;
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(i));
      pool.push_back(buf);  // most recently used last
      return buf.narrow(0, 0, numel).view(sizes);
    }
  }
  at::Tensor buf = at::empty({numel}, options);
  pool.push_back(buf);
  int64_t held = 0;
  for (const auto& b : pool) held += b.numel() * static_cast<int64_t>(sizeof(float));
  for (size_t i = 0; i + 1 < pool.size() && held > pool_limit();) {  // evict idle buffers, oldest first
    if (pool[i].storage().use_count() == 1) {
      held -= pool[i].numel() * static_cast<int64_t>(sizeof(float));
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

int64_t pool_bytes(bool release) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (release) pool.clear();  // buffers still in use live on with their tensors, outside the pool
  int64_t held = 0;
  for (const auto& b : pool) held += b.numel() * static_cast<int64_t>(sizeof(float));
  return held;
}

using at::vec::Vectorized;
using Vec = Vectorized<float>;

// Activation codes; the Python side maps names to these (`ACTIVATION_CODES`).
enum Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kSilu = 2,
  kLeakyRelu = 3,
  kPrelu = 4,
  kGelu = 5,
  kGeluTanh = 6,
  kTanh = 7,
  kSigmoid = 8,
};

// Padding modes, as `ops.PADDING_MODES` orders them.
enum Pad : int64_t { kZeros = 0, kReflect = 1, kReplicate = 2, kCircular = 3 };

// The pixel index that padding mode reads at position i of an axis of length n (`reference.map_index`); -1 for a
// pixel outside the image under zero padding.
inline int64_t map_index(int64_t i, int64_t n, int64_t pad) {
  if (i >= 0 && i < n) return i;
  switch (pad) {
    case kZeros:
      return -1;
    case kReflect: {
      if (n == 1) return 0;
      const int64_t period = 2 * (n - 1);
      int64_t r = (i < 0 ? -i : i) % period;
      return r >= n ? period - r : r;
    }
    case kCircular:
      return ((i % n) + n) % n;
    default:  // replicate
      return i < 0 ? 0 : n - 1;
  }
}

// One vector of the prologue: act(x * scale + shift), with the operations in the order the reference applies them.
template <int64_t ACT>
inline Vec activate(Vec v, const Vec& slope_or_weight) {
  const Vec zero(0.f);
  const Vec one(1.f);
  if constexpr (ACT == kIdentity) {
    return v;
  } else if constexpr (ACT == kRelu) {
    return at::vec::clamp_min(v, zero);
  } else if constexpr (ACT == kSilu) {
    return v / (one + v.neg().exp());
  } else if constexpr (ACT == kLeakyRelu || ACT == kPrelu) {
    return Vec::blendv(v * slope_or_weight, v, v > zero);
  } else if constexpr (ACT == kGelu) {
    const Vec alpha(static_cast<float>(M_SQRT1_2));
    const Vec half(0.5f);
    return v * half * (one + (v * alpha).erf());
  } else if constexpr (ACT == kGeluTanh) {
    const Vec beta(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
    const Vec kappa(0.044715f);
    const Vec half(0.5f);
    const Vec cube = v * v * v;
    return half * v * (one + (beta * (v + kappa * cube)).tanh());
  } else if constexpr (ACT == kTanh) {
    return v.tanh();
  } else {  // sigmoid
    return one / (one + v.neg().exp());
  }
}

// act(src * scale + shift) for c channels, into dst. `scale`/`shift` may be null; `weight` is PReLU's per-channel
// slope (null: `slope` for every channel).
template <int64_t ACT>
inline void prologue_row(const float* src, float* dst, int64_t c, const float* scale, const float* shift,
                         const float* weight, float slope) {
  const int64_t vs = Vec::size();
  int64_t k = 0;
  for (; k < c; k += vs) {
    const int64_t m = std::min<int64_t>(vs, c - k);
    Vec v = m == vs ? Vec::loadu(src + k) : Vec::loadu(src + k, m);
    if (scale) v = v * (m == vs ? Vec::loadu(scale + k) : Vec::loadu(scale + k, m));
    if (shift) v = v + (m == vs ? Vec::loadu(shift + k) : Vec::loadu(shift + k, m));
    Vec s(slope);
    if constexpr (ACT == kPrelu) {
      if (weight) s = m == vs ? Vec::loadu(weight + k) : Vec::loadu(weight + k, m);
    }
    v = activate<ACT>(v, s);
    if (m == vs) {
      v.store(dst + k);
    } else {
      v.store(dst + k, m);
    }
  }
}

template <int64_t ACT>
void gather_impl(const float* x, int64_t H, int64_t W, int64_t C, const int64_t* org, int64_t N, int64_t th,
                 int64_t tw, const float* scale, const float* shift, const float* weight, float slope, int64_t pad,
                 float* out) {
  // A tile row of 64 channels and 10 pixels is about 2.5 kB: a few dozen rows make a task worth a thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tw * C));
  at::parallel_for(0, N * th, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / th, i = r % th;
      const int64_t b = org[3 * n], y = map_index(org[3 * n + 1] + i, H, pad), x0 = org[3 * n + 2];
      float* dst = out + r * tw * C;
      if (y < 0) {  // a whole row of zero padding
        std::memset(dst, 0, sizeof(float) * tw * C);
        continue;
      }
      const float* sc = scale ? scale + b * C : nullptr;
      const float* sh = shift ? shift + b * C : nullptr;
      const float* base = x + (b * H + y) * W * C;
      for (int64_t j = 0; j < tw; ++j) {
        const int64_t xx = map_index(x0 + j, W, pad);
        if (xx < 0) {
          std::memset(dst + j * C, 0, sizeof(float) * C);
        } else {
          prologue_row<ACT>(base + xx * C, dst + j * C, C, sc, sh, weight, slope);
        }
      }
    }
  });
}

at::Tensor gather(const at::Tensor& x, const at::Tensor& origins, int64_t th, int64_t tw,
                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t act,
                  double slope, const std::optional<at::Tensor>& weight, int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "sparsedit_cpu.gather: x must be float32 [B, C, H, W]");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "sparsedit_cpu.gather: x must be channels-last");
  TORCH_CHECK(origins.is_contiguous() && origins.scalar_type() == at::kLong, "sparsedit_cpu.gather: origins");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = origins.size(0);
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->scalar_type() == at::kFloat &&
                                    (*t)->numel() == B * C),
                "sparsedit_cpu.gather: scale and shift must be contiguous float32 [B, C]");
  }
  TORCH_CHECK(!weight.has_value() || (weight->is_contiguous() && weight->scalar_type() == at::kFloat &&
                                      weight->numel() == C),
              "sparsedit_cpu.gather: weight must be contiguous float32 [C]");
  TORCH_CHECK(origins.dim() == 2 && origins.size(1) == 3, "sparsedit_cpu.gather: origins must be [N, 3]");
  TORCH_CHECK(th > 0 && tw > 0, "sparsedit_cpu.gather: empty tile");
  {
    const int64_t* o = origins.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(o[3 * n] >= 0 && o[3 * n] < B, "sparsedit_cpu.gather: tile ", n, " names batch ", o[3 * n],
                  " of ", B);
    }
  }
  at::Tensor out = pooled_empty({N, th, tw, C});
  const float* sc = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  const float* sh = shift.has_value() ? shift->const_data_ptr<float>() : nullptr;
  const float* wt = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* xp = x.const_data_ptr<float>();
  const int64_t* op = origins.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  const float s = static_cast<float>(slope);
#define SPARSEDIT_GATHER(A) gather_impl<A>(xp, H, W, C, op, N, th, tw, sc, sh, wt, s, pad, o)
  switch (act) {
    case kIdentity: SPARSEDIT_GATHER(kIdentity); break;
    case kRelu: SPARSEDIT_GATHER(kRelu); break;
    case kSilu: SPARSEDIT_GATHER(kSilu); break;
    case kLeakyRelu: SPARSEDIT_GATHER(kLeakyRelu); break;
    case kPrelu: SPARSEDIT_GATHER(kPrelu); break;
    case kGelu: SPARSEDIT_GATHER(kGelu); break;
    case kGeluTanh: SPARSEDIT_GATHER(kGeluTanh); break;
    case kTanh: SPARSEDIT_GATHER(kTanh); break;
    case kSigmoid: SPARSEDIT_GATHER(kSigmoid); break;
    default: TORCH_CHECK(false, "sparsedit_cpu.gather: unknown activation code ", act);
  }
#undef SPARSEDIT_GATHER
  return out;
}

// dst = src (+ res when given): one pixel's C channels, the residual add in the order the reference adds.
inline void write_row(float* dst, const float* src, const float* res, int64_t C) {
  if (res == nullptr) {
    std::memcpy(dst, src, sizeof(float) * C);
  } else {
    at::vec::map2([](Vec a, Vec b) { return a + b; }, dst, src, res, C);
  }
}

// out[b, :, y + i, x0 + j] = tiles[n, :, i, j] (+ residual[b, :, y + i, x0 + j]); tiles lie inside the image.
void scatter(at::Tensor& out, const at::Tensor& tiles, const at::Tensor& origins,
             const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && tiles.scalar_type() == at::kFloat,
              "sparsedit_cpu.scatter: float32 tensors only");
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), "sparsedit_cpu.scatter: out must be channels-last");
  TORCH_CHECK(tiles.dim() == 4 && tiles.stride(1) == 1, "sparsedit_cpu.scatter: tiles must be channels-last");
  TORCH_CHECK(!residual.has_value() || (residual->is_contiguous(at::MemoryFormat::ChannelsLast) &&
                                        residual->scalar_type() == at::kFloat && residual->sizes() == out.sizes()),
              "sparsedit_cpu.scatter: residual must be a channels-last float32 tensor shaped like out");
  const int64_t H = out.size(2), W = out.size(3), C = out.size(1);
  const int64_t N = tiles.size(0), th = tiles.size(2), tw = tiles.size(3);
  const int64_t sn = tiles.stride(0), si = tiles.stride(2), sj = tiles.stride(3);
  TORCH_CHECK(tiles.size(1) == C && origins.dim() == 2 && origins.size(0) == N && origins.size(1) == 3 &&
                  origins.is_contiguous() && origins.scalar_type() == at::kLong,
              "sparsedit_cpu.scatter: tiles [N, C, th, tw] and origins [N, 3] do not match out");
  const int64_t B = out.size(0);
  {
    const int64_t* o = origins.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(o[3 * n] >= 0 && o[3 * n] < B && o[3 * n + 1] >= 0 && o[3 * n + 1] + th <= H && o[3 * n + 2] >= 0 &&
                      o[3 * n + 2] + tw <= W,
                  "sparsedit_cpu.scatter: tile ", n, " at (", o[3 * n], ", ", o[3 * n + 1], ", ", o[3 * n + 2],
                  ") does not lie inside ", B, "x", H, "x", W);
    }
  }
  const float* tp = tiles.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  const int64_t* op = origins.const_data_ptr<int64_t>();
  float* o = out.mutable_data_ptr<float>();
  const bool packed = sj == C;  // a tile row's pixels lie back to back
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tw * C));
  at::parallel_for(0, N * th, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / th, i = r % th;
      const int64_t off = ((op[3 * n] * H + op[3 * n + 1] + i) * W + op[3 * n + 2]) * C;
      const float* src = tp + n * sn + i * si;
      float* dst = o + off;
      if (rp == nullptr && packed) {
        std::memcpy(dst, src, sizeof(float) * tw * C);
        continue;
      }
      for (int64_t j = 0; j < tw; ++j) {
        write_row(dst + j * C, src + j * sj, rp == nullptr ? nullptr : rp + off + j * C, C);
      }
    }
  });
}

// Exact mode's write of the tile pixels inside the region: rows[lin[k]] = pixel at[k] of `tiles` (+ residual[lin[k]]),
// after copying rows[lin[k]] into the returned undo rows when `keep_old`. One pass (two with the undo copy, which must
// see every old value before any is overwritten).
at::Tensor write_pixels(at::Tensor& rows, const at::Tensor& tiles, const at::Tensor& at_index,
                        const at::Tensor& lin, const std::optional<at::Tensor>& residual, bool keep_old) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.dim() >= 2,
              "sparsedit_cpu.write_pixels: rows must be contiguous float32 [..., C]");
  const int64_t C = rows.size(-1), P = rows.numel() / std::max<int64_t>(1, C);
  TORCH_CHECK(tiles.scalar_type() == at::kFloat && tiles.dim() == 4 && tiles.size(1) == C &&
                  (tiles.stride(1) == 1 || C == 1),
              "sparsedit_cpu.write_pixels: tiles must be channels-last float32 [N, C, th, tw]");
  TORCH_CHECK(at_index.scalar_type() == at::kLong && lin.scalar_type() == at::kLong && at_index.is_contiguous() &&
                  lin.is_contiguous() && at_index.numel() == lin.numel(),
              "sparsedit_cpu.write_pixels: at and lin must be int64 indices of equal length");
  TORCH_CHECK(!residual.has_value() || (residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                                        residual->numel() == rows.numel()),
              "sparsedit_cpu.write_pixels: residual must be contiguous float32 rows shaped like rows");
  const int64_t K = lin.numel(), th = tiles.size(2), tw = tiles.size(3), M = tiles.size(0) * th * tw;
  const int64_t sn = tiles.stride(0), si = tiles.stride(2), sj = tiles.stride(3);
  const int64_t* ap = at_index.const_data_ptr<int64_t>();
  const int64_t* lp = lin.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {  // engine-made indices; checked all the same, before anything is written
    TORCH_CHECK(ap[k] >= 0 && ap[k] < M && lp[k] >= 0 && lp[k] < P, "sparsedit_cpu.write_pixels: index ", k,
                " (tile pixel ", ap[k], " of ", M, ", row ", lp[k], " of ", P, ") out of range");
  }
  float* rp = rows.mutable_data_ptr<float>();
  const float* tp = tiles.const_data_ptr<float>();
  const float* res = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  at::Tensor old = keep_old ? pooled_empty({K, C}) : at::empty({0, C}, rows.options());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  if (keep_old) {
    float* op = old.mutable_data_ptr<float>();
    at::parallel_for(0, K, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) std::memcpy(op + k * C, rp + lp[k] * C, sizeof(float) * C);
    });
  }
  at::parallel_for(0, K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t m = ap[k], pix = m % (th * tw);
      const float* src = tp + (m / (th * tw)) * sn + (pix / tw) * si + (pix % tw) * sj;
      write_row(rp + lp[k] * C, src, res == nullptr ? nullptr : res + lp[k] * C, C);
    }
  });
  return old;
}

// Token rows: out[index[k]] = tokens[k] (+ residual[index[k]]), rows of C contiguous floats; parallel over rows.
void scatter_tokens(at::Tensor& out, const at::Tensor& tokens, const at::Tensor& index,
                    const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && tokens.scalar_type() == at::kFloat && out.is_contiguous() &&
                  tokens.is_contiguous() && index.is_contiguous() && index.scalar_type() == at::kLong,
              "sparsedit_cpu.scatter_tokens: contiguous float32 out and tokens, int64 index");
  const int64_t C = out.size(-1), P = out.numel() / std::max<int64_t>(1, C), K = index.numel();
  TORCH_CHECK(tokens.numel() == K * C, "sparsedit_cpu.scatter_tokens: tokens must be [len(index), C]");
  TORCH_CHECK(!residual.has_value() || (residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                                        residual->numel() == out.numel()),
              "sparsedit_cpu.scatter_tokens: residual must be contiguous float32 shaped like out");
  const int64_t* ip = index.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < P, "sparsedit_cpu.scatter_tokens: index ", ip[k], " out of range (", P, ")");
  }
  float* op = out.mutable_data_ptr<float>();
  const float* tp = tokens.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      write_row(op + ip[k] * C, tp + k * C, rp == nullptr ? nullptr : rp + ip[k] * C, C);
    }
  });
}

// `fingerprints.tensor_checksums`' two sums of each tensor's integer words (1-D, contiguous; int64, int32, int16 or
// uint8, sign- or zero-extended to 64 bits), laid out as rows of 1024: total = sum(w), and weighted = sum over the
// full rows of (row + 1) * w + MIX * (column + 1) * w, plus (rows + 1) * (position + 1) * w over the last, partial
// row; all modulo 2**64. Returns [n, 2] int64 (the same bits as the torch reductions in fingerprints.py).
template <typename W>
void word_sums(const W* w, int64_t n, uint64_t* out) {
  constexpr int64_t kRow = 1024;
  constexpr uint64_t kMix = 0x9E3779B97F4A7C15ull;
  const int64_t rows = n / kRow;
  struct Acc {
    uint64_t total = 0, weighted = 0;
  };
  const int64_t grain = std::max<int64_t>(1, 262144 / kRow);
  Acc full = at::parallel_reduce(
      0, rows, grain, Acc{},
      [&](int64_t begin, int64_t end, Acc acc) {
        for (int64_t r = begin; r < end; ++r) {
          const W* row = w + r * kRow;
          uint64_t sum = 0, cols = 0;
          for (int64_t c = 0; c < kRow; ++c) {
            const uint64_t v = static_cast<uint64_t>(static_cast<int64_t>(row[c]));
            sum += v;
            cols += static_cast<uint64_t>(c + 1) * v;
          }
          acc.total += sum;
          acc.weighted += static_cast<uint64_t>(r + 1) * sum + kMix * cols;
        }
        return acc;
      },
      [](Acc a, Acc b) { return Acc{a.total + b.total, a.weighted + b.weighted}; });
  for (int64_t j = 0; j < n - rows * kRow; ++j) {
    const uint64_t v = static_cast<uint64_t>(static_cast<int64_t>(w[rows * kRow + j]));
    full.total += v;
    full.weighted += static_cast<uint64_t>(rows + 1) * static_cast<uint64_t>(j + 1) * v;
  }
  out[0] = full.total;
  out[1] = full.weighted;
}

at::Tensor checksums(at::TensorList words) {
  const int64_t n = static_cast<int64_t>(words.size());
  at::Tensor out = at::empty({n, 2}, at::TensorOptions().dtype(at::kLong));
  auto* o = reinterpret_cast<uint64_t*>(out.mutable_data_ptr<int64_t>());
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = words[i];
    TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(),
                "sparsedit_cpu.checksums: words must be contiguous 1-D CPU tensors");
    switch (t.scalar_type()) {
      case at::kLong: word_sums(t.const_data_ptr<int64_t>(), t.numel(), o + 2 * i); break;
      case at::kInt: word_sums(t.const_data_ptr<int32_t>(), t.numel(), o + 2 * i); break;
      case at::kShort: word_sums(t.const_data_ptr<int16_t>(), t.numel(), o + 2 * i); break;
      case at::kByte: word_sums(t.const_data_ptr<uint8_t>(), t.numel(), o + 2 * i); break;
      default: TORCH_CHECK(false, "sparsedit_cpu.checksums: words must be int64, int32, int16 or uint8");
    }
  }
  return out;
}

// `regions.difference_mask(a, b, eps=0)`: [B, H, W] bool, true where any channel's word differs bit for bit (so -0.0
// against 0.0 differs and a NaN against the same NaN does not). a and b: 4-D CPU tensors of one shape, dtype and
// strides, contiguous (NCHW) or channels-last; one pass over both instead of an XOR map and two reductions.
template <typename W>
void differs_words(const W* a, const W* b, uint8_t* out, int64_t B, int64_t C, int64_t HW, bool channels_last) {
  if (channels_last) {
    at::parallel_for(0, B * HW, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, C)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const W* pa = a + p * C;
        const W* pb = b + p * C;
        W acc = 0;
        for (int64_t c = 0; c < C; ++c) acc |= static_cast<W>(pa[c] ^ pb[c]);
        out[p] = acc != 0;
      }
    });
    return;
  }
  at::parallel_for(0, B * HW, 16384, [&](int64_t begin, int64_t end) {
    int64_t p = begin;
    while (p < end) {  // runs within one batch row: channel planes are HW words apart
      const int64_t bi = p / HW, q0 = p % HW, n = std::min(end - p, HW - q0);
      uint8_t* o = out + p;
      for (int64_t q = 0; q < n; ++q) o[q] = 0;
      for (int64_t c = 0; c < C; ++c) {
        const W* pa = a + (bi * C + c) * HW + q0;
        const W* pb = b + (bi * C + c) * HW + q0;
        for (int64_t q = 0; q < n; ++q) o[q] |= static_cast<uint8_t>(pa[q] != pb[q]);
      }
      p += n;
    }
  });
}

at::Tensor differs(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes() && a.strides() == b.strides() &&
                  a.scalar_type() == b.scalar_type() && a.device().is_cpu() && b.device().is_cpu(),
              "sparsedit_cpu.differs: a and b must be 4-D CPU tensors of one shape, dtype and strides");
  const bool cl = !a.is_contiguous() && a.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || a.is_contiguous(), "sparsedit_cpu.differs: tensors must be contiguous or channels-last");
  const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  at::Tensor out = at::empty({B, a.size(2), a.size(3)}, a.options().dtype(at::kBool));
  auto* o = reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>());
  switch (a.element_size()) {
    case 1: differs_words(static_cast<const uint8_t*>(a.const_data_ptr()), static_cast<const uint8_t*>(b.const_data_ptr()), o, B, C, HW, cl); break;
    case 2: differs_words(static_cast<const uint16_t*>(a.const_data_ptr()), static_cast<const uint16_t*>(b.const_data_ptr()), o, B, C, HW, cl); break;
    case 4: differs_words(static_cast<const uint32_t*>(a.const_data_ptr()), static_cast<const uint32_t*>(b.const_data_ptr()), o, B, C, HW, cl); break;
    case 8: differs_words(static_cast<const uint64_t*>(a.const_data_ptr()), static_cast<const uint64_t*>(b.const_data_ptr()), o, B, C, HW, cl); break;
    default: TORCH_CHECK(false, "sparsedit_cpu.differs: elements must be 1, 2, 4 or 8 bytes");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sparsedit_cpu, m) {
  m.def(
      "gather(Tensor x, Tensor origins, int th, int tw, Tensor? scale, Tensor? shift, int act, float slope, "
      "Tensor? weight, int pad) -> Tensor");
  m.def("scatter(Tensor(a!) out, Tensor tiles, Tensor origins, Tensor? residual) -> ()");
  m.def("checksums(Tensor[] words) -> Tensor");
  m.def("differs(Tensor a, Tensor b) -> Tensor");
  m.def("pool_bytes(Tensor like, bool release) -> int");
  m.def("scatter_tokens(Tensor(a!) out, Tensor tokens, Tensor index, Tensor? residual) -> ()");
  m.def("write_pixels(Tensor(a!) rows, Tensor tiles, Tensor at, Tensor lin, Tensor? residual, bool keep_old) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsedit_cpu, CPU, m) {
  m.impl("gather", TORCH_FN(gather));
  m.impl("scatter", TORCH_FN(scatter));
  m.impl("write_pixels", TORCH_FN(write_pixels));
  m.impl("checksums", TORCH_FN(checksums));
  m.impl("differs", TORCH_FN(differs));
  m.impl("pool_bytes", [](const at::Tensor&, bool release) { return pool_bytes(release); });
  m.impl("scatter_tokens", TORCH_FN(scatter_tokens));
}
