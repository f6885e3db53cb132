// omnimoe run: the layer on the tensors of a safetensors file, results to another.
#include <cstdio>
#include <cstring>

#include "commands.hpp"
#include "omnimoe/device.hpp"
#include "omnimoe/layer.hpp"
#include "run_input.hpp"

namespace omnimoe::tool {
namespace {

constexpr const char* kRunUsage =
    "usage: omnimoe run --in IN.safetensors --out OUT.safetensors [--device cpu|cuda] [--train] [--backward]\n"
    "                   [--schedule auto|expert|token]\n"
    "\n"
    "Runs the layer on the tensors of IN (config in its __metadata__; see README.md, 'File\n"
    "format') and writes y, expert_ids (I64), scores and gates to OUT, plus the updated running\n"
    "statistics with --train and batchnorm, and the gradients with --backward.\n"
    "  --device    cpu (default) or cuda\n"
    "  --train     training mode: batchnorm uses batch statistics and updates the running ones\n"
    "  --backward  also compute the gradients of <grad_y, y> (IN must hold grad_y)\n"
    "  --schedule  CUDA experts path: auto (default: chosen from the sizes), expert (expert-centric\n"
    "              tile products) or token (token-centric per-token gathers); the CPU ignores it\n";

// A file tensor holding `v`'s values converted to `dtype`.
io::StTensor file_tensor(const std::string& name, const TensorView& v, DType dtype) {
  Tensor host = convert_tensor(v, dtype, Device::cpu);
  io::StTensor t;
  t.name = name;
  t.dtype = dtype;
  t.shape.assign(v.shape.begin(), v.shape.begin() + v.rank);
  t.data.resize(host.view().bytes());
  std::memcpy(t.data.data(), host.view().data, t.data.size());
  return t;
}

}  // namespace

int cmd_run(Args& args) {
  if (args.help()) {
    std::fputs(kRunUsage, stdout);
    return 0;
  }
  const std::string in_path = args.required("--in");
  const std::string out_path = args.required("--out");
  const Device device = device_option(args.value("--device").value_or("cpu"));
  const Mode mode = args.flag("--train") ? Mode::training : Mode::inference;
  const bool backward = args.flag("--backward");
  const Schedule schedule = schedule_option(args.value("--schedule"));
  args.finish();
  require_device(device);

  io::StFile file;
  throw_if_error(io::read_safetensors(in_path, &file));  // messages start with the path
  RunInput in = load_run_input(file, device, mode, backward);
  file = io::StFile{};  // the staged copies are all that is needed from here on
  LayerTensors& l = in.layer;
  l.cfg.schedule = schedule;  // an execution choice of this run, not part of the file's layer

  ForwardBuffers fwd = forward_buffers(l);
  GradientBuffers grads;
  if (backward) grads = gradient_buffers(l);
  Buffer ws = workspace(l, backward);
  throw_if_error(forward(l.cfg, mode, l.x[0].view(), l.params(), fwd.outputs(), as_workspace(ws)));
  if (backward)
    throw_if_error(omnimoe::backward(l.cfg, mode, l.x[0].view(), l.params(), fwd.expert_ids.view(),
                                     l.grad_y.view(), grads.gradients(), as_workspace(ws)));
  throw_if_error(synchronize(device));

  io::StFile out;
  out.metadata = {{"top_k", std::to_string(l.cfg.top_k)},       {"grid_rows", std::to_string(l.cfg.grid_rows)},
                  {"grid_cols", std::to_string(l.cfg.grid_cols)}, {"router_norm", name(l.cfg.router_norm)},
                  {"gate", name(l.cfg.gate)},                     {"activation", name(l.cfg.activation)},
                  {"mode", name(mode)},                           {"schedule", name(l.cfg.schedule)}};
  out.tensors.push_back(file_tensor("y", fwd.y.view(), l.dtype));
  out.tensors.push_back(file_tensor("expert_ids", fwd.expert_ids.view(), DType::i64));
  out.tensors.push_back(file_tensor("scores", fwd.scores.view(), l.dtype));
  out.tensors.push_back(file_tensor("gates", fwd.gates.view(), l.dtype));
  if (mode == Mode::training && l.cfg.router_norm == RouterNorm::batchnorm)
    for (const LayerMember& m : kLayerMembers)
      if (m.is_statistic) out.tensors.push_back(file_tensor(m.name, (l.*m.tensor).view(), in.file_dtype.at(m.name)));
  if (backward)
    for (const GradientMember& m : kGradientMembers)
      if ((grads.*m.tensor).defined())
        out.tensors.push_back(file_tensor(std::string("grad_") + m.name, (grads.*m.tensor).view(), l.dtype));

  throw_if_error(io::write_safetensors(out_path, out));  // temp file + rename: all or nothing
  return 0;
}

}  // namespace omnimoe::tool
