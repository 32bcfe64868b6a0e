// Contract: included ahead of decode_split.wgsl, which asks key_kept; binds nothing.
//
// Not a kernel; split-K decode's choice when there is no key-padding mask: every key in range
// is kept, and no mask buffer is bound.

fn key_kept(b: u32, j: u32) -> bool {
    return true;
}
