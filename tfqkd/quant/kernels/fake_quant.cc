// tfqkd's fake quantizers as fused CPU kernels, for training (issue 16).
//
// TensorFlow's own ops take four passes over an activation tensor forward (divide, clip,
// round, multiply) and about eight backward for the learned step (input gradient, step-gradient
// terms, their sum, two squared norms); XLA fuses them but launches slowly on CPU. Each kernel
// here is one pass, split over TensorFlow's CPU worker threads, like FakeQuantWithMinMaxVars.
//
// Learned step (LSQ; tfqkd/quant/quantizers.py, _learned_step_fake_quant):
//   forward   y  = round_half_even(clip(x / s, qmin, qmax)) * s
//   backward  gx = u where qmin <= x / s <= qmax, else 0 (straight-through, LSQ)
//             d log s = clip(g * sum(u * (inside ? round(x/s) - x/s : clip(x/s))) / s, -b, b)
//             with g the LSQ gradient scale and b = ||u|| / ||x|| (its bound)
// Affine (thesis 5.1.9; _affine_fake_quant): codes = clip(round_half_even(x / scale) + zp, qmin, qmax),
//   y = (codes - zp) * scale; gx = (u * scale) / scale where the unclipped code is in range, else 0.
// Power of two (the DPU; _pof2_fake_quant): y = clip(round(x * up), qmin, qmax) * down, rounding half
//   to even or half up; gx = (u * down) * up where the rounded code is in range, else 0.
// Range: a tensor's minimum and maximum in one pass (the running statistics of the last two).
//
// Every output is bit-identical to TensorFlow's ops (IEEE division and rounding, round half to
// even in the default rounding mode, the same order of operations, no contraction: built with
// -ffp-contract=off), except the learned step's gradient, whose three sums are taken in
// blocks of a fixed size whatever the thread count, each in float lanes summed into double, so
// they do not depend on the machine's threads (resumed runs are bit-identical).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfqkd {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

constexpr int64_t kBlock = 16384;  // elements per reduction block (fixed: deterministic sums)
constexpr int64_t kChunk = 512;    // elements summed in float before the double accumulation

// clip_by_value's min(max(v, lo), hi) in a form the compiler vectorizes (std::fmin/fmax it does not).
inline float Clip(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Reads input `index`, which must hold one float.
bool ReadScalar(OpKernelContext* context, int index, float* value) {
  const Tensor& tensor = context->input(index);
  if (tensor.NumElements() != 1) {
    context->CtxFailure(absl::InvalidArgumentError("a scale input must hold one value"));
    return false;
  }
  *value = tensor.flat<float>()(0);
  return true;
}

// y[i] = body(x[i], u[i]) for every element, in parallel (u: x itself when absent). The output reuses
// input `reuse` when nothing else holds it. The body sees values, not pointers, and is copied into
// each shard: its captured scalars stay in registers and the loop vectorizes.
template <typename Body>
void ElementWise(OpKernelContext* context, int reuse, const Tensor& input, const Tensor* other, Body body) {
  Tensor* output = nullptr;
  OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({reuse}, 0, input.shape(), &output));
  const float* x = input.flat<float>().data();
  const float* u = other != nullptr ? other->flat<float>().data() : x;
  float* y = output->flat<float>().data();
  context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      input.NumElements(), 8, [=](int64_t begin, int64_t end) {
        const Body f = body;
        for (int64_t i = begin; i < end; ++i) y[i] = f(x[i], u[i]);
      });
}

// Whether the upstream gradient (input 0) has the shape of the quantized input; sets the status if not.
bool SameShape(OpKernelContext* context, const Tensor& input) {
  if (context->input(0).shape() == input.shape()) return true;
  context->CtxFailure(absl::InvalidArgumentError("upstream gradient and input differ in shape"));
  return false;
}

// An op whose attributes are the integer code range [qmin, qmax] of its quantizer.
class CodeRangeOp : public OpKernel {
 public:
  explicit CodeRangeOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("qmin", &qmin_));
    OP_REQUIRES_OK(context, context->GetAttr("qmax", &qmax_));
  }

 protected:
  float qmin_, qmax_;
};

// A power-of-two op: the code range and the rounding (half up, or half to even).
class Pof2Op : public CodeRangeOp {
 public:
  explicit Pof2Op(OpKernelConstruction* context) : CodeRangeOp(context) {
    OP_REQUIRES_OK(context, context->GetAttr("half_up", &half_up_));
  }

 protected:
  bool half_up_;
};

class LearnedStepFakeQuantOp : public CodeRangeOp {
 public:
  using CodeRangeOp::CodeRangeOp;

  void Compute(OpKernelContext* context) override {
    float step;
    if (!ReadScalar(context, 1, &step)) return;
    const float qmin = qmin_, qmax = qmax_;
    // In training the gradient keeps x, so the output gets its own buffer.
    ElementWise(context, 0, context->input(0), nullptr,
                [=](float x, float) { return std::nearbyint(Clip(x / step, qmin, qmax)) * step; });
  }
};

// Eight floats as one value: GCC and Clang compile these to SIMD (AVX on x86, NEON on ARM).
typedef float Floats __attribute__((vector_size(32)));
constexpr int kLanes = sizeof(Floats) / sizeof(float);

// round half to even of |v| < 2**22 (codes): v + 2**23 has no fraction bits left, so the default
// rounding mode rounds it; the branch-free form vectorizes where std::nearbyint in a select does not.
inline Floats RoundCodes(Floats v) {
  const Floats magic = v < 0.0f ? Floats{} - 8388608.0f : Floats{} + 8388608.0f;
  return (v + magic) - magic;
}

// One reduction block: the input gradient, and the block's three sums into total[0..2].
void GradBlock(const float* u, const float* x, float* gx, int64_t n, float step, float qmin, float qmax,
               double* total) {
  total[0] = total[1] = total[2] = 0.0;
  const Floats zero{}, one = zero + 1.0f;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t chunk_end = std::min(n, c + kChunk);
    Floats terms{}, u2{}, x2{};
    int64_t i = c;
    for (; i + kLanes <= chunk_end; i += kLanes) {
      Floats ui, xi;
      std::memcpy(&ui, u + i, sizeof(Floats));
      std::memcpy(&xi, x + i, sizeof(Floats));
      const Floats scaled = xi / step;
      Floats clipped = scaled < qmin ? zero + qmin : scaled;
      clipped = clipped > qmax ? zero + qmax : clipped;
      const auto inside = clipped == scaled;
      const Floats grad = ui * (inside ? one : zero);  // upstream * cast(inside), as TensorFlow computes it
      std::memcpy(gx + i, &grad, sizeof(Floats));
      terms += ui * (inside ? RoundCodes(clipped) - scaled : clipped);
      u2 += ui * ui;
      x2 += xi * xi;
    }
    double tail[3] = {0.0, 0.0, 0.0};
    for (; i < chunk_end; ++i) {  // the last elements of the tensor
      const float ui = u[i], xi = x[i];
      const float scaled = xi / step;
      const float clipped = Clip(scaled, qmin, qmax);
      const bool inside = clipped == scaled;
      gx[i] = ui * (inside ? 1.0f : 0.0f);
      tail[0] += ui * (inside ? std::nearbyint(clipped) - scaled : clipped);
      tail[1] += ui * ui;
      tail[2] += xi * xi;
    }
    for (int l = 0; l < kLanes; ++l) {
      total[0] += terms[l];
      total[1] += u2[l];
      total[2] += x2[l];
    }
    for (int k = 0; k < 3; ++k) total[k] += tail[k];
  }
}

class LearnedStepFakeQuantGradOp : public CodeRangeOp {
 public:
  explicit LearnedStepFakeQuantGradOp(OpKernelConstruction* context) : CodeRangeOp(context) {
    OP_REQUIRES_OK(context, context->GetAttr("grad_scale", &grad_scale_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& upstream = context->input(0);
    const Tensor& input = context->input(2);
    if (!SameShape(context, input)) return;
    float step;
    if (!ReadScalar(context, 1, &step)) return;
    Tensor* grad_input = nullptr;
    Tensor* grad_step = nullptr;
    // In place of the upstream gradient, which nothing reads after this op: one buffer less to fill.
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, input.shape(), &grad_input));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(1).shape(), &grad_step));
    const int64_t n = input.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(3 * blocks, 0.0);
    const float* u = upstream.flat<float>().data();
    const float* x = input.flat<float>().data();
    float* gx = grad_input->flat<float>().data();
    double* out = partial.data();
    const float qmin = qmin_, qmax = qmax_;
    auto work = [=](int64_t first_block, int64_t last_block) {
      for (int64_t b = first_block; b < last_block; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        GradBlock(u + begin, x + begin, gx + begin, end - begin, step, qmin, qmax, out + 3 * b);
      }
    };
    context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(blocks, 16 * kBlock, work);
    double total[3] = {0.0, 0.0, 0.0};
    for (int64_t b = 0; b < blocks; ++b) {
      for (int k = 0; k < 3; ++k) total[k] += partial[3 * b + k];
    }
    // LSQ's step gradient, as a relative change of s (the gradient of log s), within its bound.
    const double relative = total[0] * grad_scale_ / step;
    const double bound = std::sqrt(total[1] / (total[2] + 1e-30));
    grad_step->flat<float>()(0) = static_cast<float>(std::min(std::max(relative, -bound), bound));
  }

 private:
  float grad_scale_;
};

class AffineFakeQuantOp : public CodeRangeOp {
 public:
  using CodeRangeOp::CodeRangeOp;

  void Compute(OpKernelContext* context) override {
    float scale, zero_point;
    if (!ReadScalar(context, 1, &scale) || !ReadScalar(context, 2, &zero_point)) return;
    const float qmin = qmin_, qmax = qmax_;
    ElementWise(context, 0, context->input(0), nullptr, [=](float x, float) {
      const float codes = Clip(std::nearbyint(x / scale) + zero_point, qmin, qmax);
      return (codes - zero_point) * scale;
    });
  }
};

class AffineFakeQuantGradOp : public CodeRangeOp {
 public:
  using CodeRangeOp::CodeRangeOp;

  void Compute(OpKernelContext* context) override {
    float scale, zero_point;
    if (!ReadScalar(context, 2, &scale) || !ReadScalar(context, 3, &zero_point)) return;
    const Tensor& input = context->input(1);
    if (!SameShape(context, input)) return;
    const float qmin = qmin_, qmax = qmax_;
    ElementWise(context, 0, input, &context->input(0), [=](float x, float u) {
      const float codes = std::nearbyint(x / scale) + zero_point;
      return (codes >= qmin) & (codes <= qmax) ? (u * scale) / scale : 0.0f / scale;
    });
  }
};

// The rounding is a template argument: chosen once per op, not per element, so the loops vectorize.
template <bool kHalfUp>
inline float RoundPof2(float v) {
  return kHalfUp ? std::floor(v + 0.5f) : std::nearbyint(v);
}

class Pof2FakeQuantOp : public Pof2Op {
 public:
  using Pof2Op::Pof2Op;

  void Compute(OpKernelContext* context) override {
    float up, down;
    if (!ReadScalar(context, 1, &up) || !ReadScalar(context, 2, &down)) return;
    const float qmin = qmin_, qmax = qmax_;
    auto run = [&](auto half_up) {
      ElementWise(context, 0, context->input(0), nullptr, [=](float x, float) {
        return Clip(RoundPof2<decltype(half_up)::value>(x * up), qmin, qmax) * down;
      });
    };
    half_up_ ? run(std::true_type{}) : run(std::false_type{});
  }
};

class Pof2FakeQuantGradOp : public Pof2Op {
 public:
  using Pof2Op::Pof2Op;

  void Compute(OpKernelContext* context) override {
    float up, down;
    if (!ReadScalar(context, 2, &up) || !ReadScalar(context, 3, &down)) return;
    const Tensor& input = context->input(1);
    if (!SameShape(context, input)) return;
    const float qmin = qmin_, qmax = qmax_;
    auto run = [&](auto half_up) {
      ElementWise(context, 0, input, &context->input(0), [=](float x, float u) {
        const float rounded = RoundPof2<decltype(half_up)::value>(x * up);
        return (rounded >= qmin) & (rounded <= qmax) ? (u * down) * up : 0.0f * up;
      });
    };
    half_up_ ? run(std::true_type{}) : run(std::false_type{});
  }
};

// Minimum and maximum of a tensor in one pass (exact: min and max do not round), per fixed block.
class RangeOp : public OpKernel {
 public:
  explicit RangeOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    const int64_t n = input.NumElements();
    OP_REQUIRES(context, n > 0, absl::InvalidArgumentError("the range of an empty tensor"));
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<float> lows(blocks), highs(blocks);
    const float* x = input.flat<float>().data();
    float* lo = lows.data();
    float* hi = highs.data();
    context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        blocks, 2 * kBlock, [=](int64_t first, int64_t last) {
          for (int64_t b = first; b < last; ++b) {
            const int64_t end = std::min(n, (b + 1) * kBlock);
            Floats low = Floats{} + x[b * kBlock], high = low;  // lanes, as in GradBlock
            int64_t i = b * kBlock;
            for (; i + kLanes <= end; i += kLanes) {
              Floats v;
              std::memcpy(&v, x + i, sizeof(Floats));
              low = v < low ? v : low;
              high = v > high ? v : high;
            }
            float lane_low = low[0], lane_high = high[0];
            for (int l = 1; l < kLanes; ++l) {
              lane_low = low[l] < lane_low ? low[l] : lane_low;
              lane_high = high[l] > lane_high ? high[l] : lane_high;
            }
            for (; i < end; ++i) {
              lane_low = x[i] < lane_low ? x[i] : lane_low;
              lane_high = x[i] > lane_high ? x[i] : lane_high;
            }
            lo[b] = lane_low;
            hi[b] = lane_high;
          }
        });
    Tensor* low = nullptr;
    Tensor* high = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &low));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({}), &high));
    low->scalar<float>()() = *std::min_element(lows.begin(), lows.end());
    high->scalar<float>()() = *std::max_element(highs.begin(), highs.end());
  }
};

// Shape function of the affine and power-of-two gradients: the gradient has the shape of x (input 1).
absl::Status GradientOfInput1(tensorflow::shape_inference::InferenceContext* c) {
  c->set_output(0, c->input(1));
  return absl::OkStatus();
}

REGISTER_OP("TfqkdLearnedStepFakeQuant")
    .Input("x: float")
    .Input("step: float")
    .Output("y: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("TfqkdLearnedStepFakeQuantGrad")
    .Input("upstream: float")
    .Input("step: float")
    .Input("x: float")
    .Output("grad_x: float")
    .Output("grad_log_step: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("grad_scale: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(2));
      c->set_output(1, c->input(1));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfqkdLearnedStepFakeQuant").Device(DEVICE_CPU), LearnedStepFakeQuantOp);
REGISTER_KERNEL_BUILDER(Name("TfqkdLearnedStepFakeQuantGrad").Device(DEVICE_CPU), LearnedStepFakeQuantGradOp);

REGISTER_OP("TfqkdAffineFakeQuant")
    .Input("x: float")
    .Input("scale: float")
    .Input("zero_point: float")
    .Output("y: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("TfqkdAffineFakeQuantGrad")
    .Input("upstream: float")
    .Input("x: float")
    .Input("scale: float")
    .Input("zero_point: float")
    .Output("grad_x: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .SetShapeFn(GradientOfInput1);

REGISTER_OP("TfqkdPof2FakeQuant")
    .Input("x: float")
    .Input("up: float")
    .Input("down: float")
    .Output("y: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("half_up: bool")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("TfqkdPof2FakeQuantGrad")
    .Input("upstream: float")
    .Input("x: float")
    .Input("up: float")
    .Input("down: float")
    .Output("grad_x: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("half_up: bool")
    .SetShapeFn(GradientOfInput1);

REGISTER_OP("TfqkdRange")
    .Input("x: float")
    .Output("low: float")
    .Output("high: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Scalar());
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfqkdAffineFakeQuant").Device(DEVICE_CPU), AffineFakeQuantOp);
REGISTER_KERNEL_BUILDER(Name("TfqkdAffineFakeQuantGrad").Device(DEVICE_CPU), AffineFakeQuantGradOp);
REGISTER_KERNEL_BUILDER(Name("TfqkdPof2FakeQuant").Device(DEVICE_CPU), Pof2FakeQuantOp);
REGISTER_KERNEL_BUILDER(Name("TfqkdPof2FakeQuantGrad").Device(DEVICE_CPU), Pof2FakeQuantGradOp);
REGISTER_KERNEL_BUILDER(Name("TfqkdRange").Device(DEVICE_CPU), RangeOp);

}  // namespace
}  // namespace tfqkd
