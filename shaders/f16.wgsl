// Contract: the host puts this file first in a module, before any declaration; nothing else may precede it.
//
// Not a kernel. Turns on WGSL's f16 type for the f16 storage variants of the kernels
// (Precision::F16): the device must have the `shader-f16` feature (wgpu's SHADER_F16), which the
// host checks before it builds any of them.
enable f16;
