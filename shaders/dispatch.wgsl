// Contract: the includer declares no @group(1) binding and starts `main` with workgroup_index(wid, nwg), skipping indices past its total.
//
// Not a kernel; the host puts this file ahead of every kernel.
//
// The host may split one dispatch into several smaller dispatches of the same grid ("chunks"),
// so that no single submission runs for long: a GL context is locked for a whole submission (a
// second thread waiting on it gives up after a few seconds), and desktop and browser watchdogs
// reset a GPU whose submission runs for seconds. Chunk c of a dispatch covers the workgroups
// c * (grid size) .. (c + 1) * (grid size) - 1; the host binds the chunk's number at a dynamic
// offset into one small uniform table per device, so chunking allocates nothing per call.
//
// Bindings (group 1):
//   0  chunk  uniform, dynamic offset  Chunk, below (16 bytes)

struct Chunk {
    index: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(1) @binding(0) var<uniform> chunk: Chunk;

// The workgroup's index over the whole (unchunked) dispatch, from a grid that may have been
// folded into 2D or 3D where one dimension would pass the device's limit.
fn workgroup_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return chunk.index * (nwg.x * nwg.y * nwg.z) + wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}
