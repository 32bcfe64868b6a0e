// Streaming-read ceiling (benchmarks only): sums a buffer of vec4, one partial sum per
// workgroup, so that the rate at which the adapter's kernels can read memory with vec4 loads is
// measured beside the decode kernel that reads K and V the same way.
//
//     out[w] = sum of every element of src[w · per .. min((w + 1) · per, n4)]  (vec4 indices)
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p    uniform             StreamParams, below
//   1  src  storage, read       vec4<f32> [n4]
//   2  out  storage, read_write f32 [workgroups]
//
// WG invocations per workgroup read consecutive vec4 (coalesced), then a tree reduction in
// workgroup memory; the workgroup index comes from dispatch.wgsl.

override WG: u32 = 256u;

struct StreamParams {
    n4: u32,
    per: u32,
    groups: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: StreamParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let w = workgroup_index(wid, nwg);
    if (w >= p.groups) {
        return;
    }
    let start = w * p.per;
    let end = min(start + p.per, p.n4);
    var acc = vec4<f32>(0.0);
    for (var i = start + li; i < end; i += WG) {
        acc += src[i];
    }
    red[li] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        out[w] = red[0];
    }
}
