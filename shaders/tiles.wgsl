// Contract: the includer declares `override NV: u32` (1 to 4); the host puts this file after dispatch.wgsl.
//
// Register tiles shared by the matmul-shaped kernels (gemm, scores, weighted_sum,
// fused_attention); the host puts this file ahead of each of them. Not a kernel: no bindings.
//
// An invocation owns 8 rows of an output. For products that end in value columns (gemm,
// weighted_sum, the P V of fused_attention) it holds NV vec4 column groups of each row, in
// named registers (naga turns arrays indexed by loop variables into memory round-trips); for
// scores (S = Q Kᵀ) it holds 8 keys of each row. Every kernel that includes this declares
// `override NV: u32` (1 to 4); members past NV stay zero and the compiler drops their work.
//
// Each step loads a vec4 per row (4 steps of depth) and 4 rows of the other operand, then does
// 8 x 4 x NV vec4 multiply-adds: each loaded vec4 feeds 8 rows. The ratio of arithmetic to
// loaded values is what limits these kernels, on GPUs (shared-memory bandwidth) and on CPU
// implementations of Vulkan (each load is a per-lane loop there).

// NV vec4 columns of one row.
struct Row {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

// Eight rows of NV vec4 columns: an invocation's accumulator.
struct Rows8 {
    r0: Row,
    r1: Row,
    r2: Row,
    r3: Row,
    r4: Row,
    r5: Row,
    r6: Row,
    r7: Row,
}

// One vec4 of depth for each of eight rows (a column slice of the left operand).
struct Col8 {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
    a4: vec4<f32>,
    a5: vec4<f32>,
    a6: vec4<f32>,
    a7: vec4<f32>,
}

fn row_zero() -> Row {
    return Row(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
}

fn rows_zero() -> Rows8 {
    let z = row_zero();
    return Rows8(z, z, z, z, z, z, z, z);
}

// Row r of an accumulator, for loops over the rows (unrolled by the compiler).
fn row_of(acc: Rows8, r: u32) -> Row {
    switch r {
        case 0u: { return acc.r0; }
        case 1u: { return acc.r1; }
        case 2u: { return acc.r2; }
        case 3u: { return acc.r3; }
        case 4u: { return acc.r4; }
        case 5u: { return acc.r5; }
        case 6u: { return acc.r6; }
        default: { return acc.r7; }
    }
}

// Column group c of a row, for loops over the NV groups (unrolled by the compiler).
fn col_of(r: Row, c: u32) -> vec4<f32> {
    switch c {
        case 0u: { return r.c0; }
        case 1u: { return r.c1; }
        case 2u: { return r.c2; }
        default: { return r.c3; }
    }
}

fn scale_row(acc: Row, s: f32) -> Row {
    return Row(acc.c0 * s, acc.c1 * s, acc.c2 * s, acc.c3 * s);
}

fn add_row(acc: Row, v: Row) -> Row {
    return Row(acc.c0 + v.c0, acc.c1 + v.c1, acc.c2 + v.c2, acc.c3 + v.c3);
}

// acc + a.x b0 + a.y b1 + a.z b2 + a.w b3, on the NV columns that exist.
fn fma4_row(acc: Row, a: vec4<f32>, b0: Row, b1: Row, b2: Row, b3: Row) -> Row {
    var r = acc;
    r.c0 += a.x * b0.c0 + a.y * b1.c0 + a.z * b2.c0 + a.w * b3.c0;
    if (NV > 1u) { r.c1 += a.x * b0.c1 + a.y * b1.c1 + a.z * b2.c1 + a.w * b3.c1; }
    if (NV > 2u) { r.c2 += a.x * b0.c2 + a.y * b1.c2 + a.z * b2.c2 + a.w * b3.c2; }
    if (NV > 3u) { r.c3 += a.x * b0.c3 + a.y * b1.c3 + a.z * b2.c3 + a.w * b3.c3; }
    return r;
}

// One step of depth 4: acc[r] += a[r] · [b0; b1; b2; b3] for the eight rows.
fn mma8(acc: Rows8, a: Col8, b0: Row, b1: Row, b2: Row, b3: Row) -> Rows8 {
    return Rows8(
        fma4_row(acc.r0, a.a0, b0, b1, b2, b3),
        fma4_row(acc.r1, a.a1, b0, b1, b2, b3),
        fma4_row(acc.r2, a.a2, b0, b1, b2, b3),
        fma4_row(acc.r3, a.a3, b0, b1, b2, b3),
        fma4_row(acc.r4, a.a4, b0, b1, b2, b3),
        fma4_row(acc.r5, a.a5, b0, b1, b2, b3),
        fma4_row(acc.r6, a.a6, b0, b1, b2, b3),
        fma4_row(acc.r7, a.a7, b0, b1, b2, b3),
    );
}

// Eight scores of one row: keys j = 0..3 (a) and 4..7 (b) of the invocation.
struct Keys8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

// Eight rows of eight scores.
struct Scores8 {
    s0: Keys8,
    s1: Keys8,
    s2: Keys8,
    s3: Keys8,
    s4: Keys8,
    s5: Keys8,
    s6: Keys8,
    s7: Keys8,
}

// One vec4 of depth for each of the invocation's eight keys.
struct K8 {
    k0: vec4<f32>,
    k1: vec4<f32>,
    k2: vec4<f32>,
    k3: vec4<f32>,
    k4: vec4<f32>,
    k5: vec4<f32>,
    k6: vec4<f32>,
    k7: vec4<f32>,
}

fn scores_zero() -> Scores8 {
    let z = Keys8(vec4<f32>(0.0), vec4<f32>(0.0));
    return Scores8(z, z, z, z, z, z, z, z);
}

// Row r of a score tile, for loops over the rows (unrolled by the compiler).
fn keys_of(acc: Scores8, r: u32) -> Keys8 {
    switch r {
        case 0u: { return acc.s0; }
        case 1u: { return acc.s1; }
        case 2u: { return acc.s2; }
        case 3u: { return acc.s3; }
        case 4u: { return acc.s4; }
        case 5u: { return acc.s5; }
        case 6u: { return acc.s6; }
        default: { return acc.s7; }
    }
}

fn dot8(s: Keys8, q: vec4<f32>, k: K8) -> Keys8 {
    return Keys8(
        s.a + vec4<f32>(dot(q, k.k0), dot(q, k.k1), dot(q, k.k2), dot(q, k.k3)),
        s.b + vec4<f32>(dot(q, k.k4), dot(q, k.k5), dot(q, k.k6), dot(q, k.k7)),
    );
}

// One step of depth 4 of S = Q Kᵀ: every row's vec4 of Q against every key's vec4 of K.
fn qk8(acc: Scores8, q: Col8, k: K8) -> Scores8 {
    return Scores8(
        dot8(acc.s0, q.a0, k),
        dot8(acc.s1, q.a1, k),
        dot8(acc.s2, q.a2, k),
        dot8(acc.s3, q.a3, k),
        dot8(acc.s4, q.a4, k),
        dot8(acc.s5, q.a5, k),
        dot8(acc.s6, q.a6, k),
        dot8(acc.s7, q.a7, k),
    );
}

// Where workgroup `tile` works, in an output of several matrices (one per batch and head, or
// one for gemm), each cut into tiles_per_mat tiles of `rows` x `cols` with tiles_n across: the
// matrix, and the tile's first row and first column (in the kernel's own column unit).
struct TileOrigin {
    mat: u32,
    row0: u32,
    col0: u32,
}

fn tile_origin(tile: u32, tiles_per_mat: u32, tiles_n: u32, rows: u32, cols: u32) -> TileOrigin {
    let in_mat = tile % tiles_per_mat;
    return TileOrigin(tile / tiles_per_mat, (in_mat / tiles_n) * rows, (in_mat % tiles_n) * cols);
}
