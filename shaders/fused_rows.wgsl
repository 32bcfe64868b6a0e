// Fused attention with whole rows per invocation: the same result as fused_attention.wgsl,
// O = softmax(scale · Q Kᵀ + bias, masked) V without storing the score matrix, with the same
// parameters, bindings, masks, packing of GQA heads as rows and storage precisions (see that
// file's header; fused_common.wgsl holds what the two share). It is another way to cut the
// work, offered to the autotuner as candidate tiles (`RowTiles` on the host), never picked by
// a rule: the tuner times it on the user's adapter.
//
// The partition follows cubek's `unit` attention (Burn's pick on CPU drivers): each
// invocation owns R packed query rows over the whole head width, with their Q and their output
// accumulator in registers for the whole kernel, and runs its own online softmax: no score
// leaves the invocation, so there is no cross-invocation reduction, no P tile in workgroup
// memory and no barrier for the softmax. Every loaded vec4 of K feeds R rows' dot products
// and every vec4 of V R rows' outputs: 4 R multiply-adds per load, against 32 for
// fused_attention.wgsl's shared tiles but without their re-staging of Q for every block of
// keys, their P round trip through workgroup memory and their reductions.
//
// Bindings: those of fused_attention.wgsl (group 0: 0 p, 1-3 or 1 Q/K/V, 4 key_mask,
// 5 bias, 6 out, 7 lq, 8 lkv, 9 lse, as the io includes chosen by `FusedIo` declare them;
// group 1: dispatch.wgsl's chunk index).
//
// Layout: a workgroup of WG invocations owns R WG consecutive packed rows of one (batch,
// kv head); invocation t owns rows R t .. R t + R - 1 (R <= 8). A row of Q or O is a Row16:
// 16 named vec4 (heads up to 64 wide; vec4s past a width stay zero). Registers are named
// values, never arrays indexed by a loop variable, which compilers may keep in memory (a load
// per use; see tiles.wgsl). Keys go 4 at a time: a Keys4 holds K (or V) of 4 keys as 16
// mat4x4, matrix d4 having the 4 keys' vec4 d4 as its columns, so that q · K is 16 vec-matrix
// products and P V 16 matrix-vector products. K and V are read straight from storage by
// every invocation (DIRECT: no workgroup memory, no barrier; what suits a device whose
// workgroup memory costs as much as a buffer read) or staged 16 keys at a time per workgroup
// in `k_stage` and `v_stage` ([key][d4], 16 x 16 vec4 each). With causal masking the
// workgroup stops after the last key its rows may see, and an invocation skips the keys past
// its own rows' last key. The workgroup index comes from dispatch.wgsl (folded grids, chunked
// dispatches).

override WG: u32 = 32u;        // invocations per workgroup
override R: u32 = 8u;          // packed rows per invocation, 1 to 8
override DIRECT: bool = false; // read K and V from storage rather than staging them

// Keys staged per workgroup step; the host checks heads fit 4 D4 = 64.
const SK: u32 = 16u;
const D4: u32 = 16u;

var<workgroup> k_stage: array<vec4<f32>, SK * D4>;
var<workgroup> v_stage: array<vec4<f32>, SK * D4>;

// One row of Q or O, 64 wide.
struct Row16 {
    c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>,
    c4: vec4<f32>, c5: vec4<f32>, c6: vec4<f32>, c7: vec4<f32>,
    c8: vec4<f32>, c9: vec4<f32>, c10: vec4<f32>, c11: vec4<f32>,
    c12: vec4<f32>, c13: vec4<f32>, c14: vec4<f32>, c15: vec4<f32>,
}

// K or V of 4 keys: column j of m<d4> is key j's vec4 d4.
struct Keys4 {
    m0: mat4x4<f32>, m1: mat4x4<f32>, m2: mat4x4<f32>, m3: mat4x4<f32>,
    m4: mat4x4<f32>, m5: mat4x4<f32>, m6: mat4x4<f32>, m7: mat4x4<f32>,
    m8: mat4x4<f32>, m9: mat4x4<f32>, m10: mat4x4<f32>, m11: mat4x4<f32>,
    m12: mat4x4<f32>, m13: mat4x4<f32>, m14: mat4x4<f32>, m15: mat4x4<f32>,
}

// A row's running state: its output accumulator, maximum and sum.
struct RowState {
    o: Row16,
    m: f32,
    l: f32,
}

fn row16_zero() -> Row16 {
    let z = vec4<f32>(0.0);
    return Row16(z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z);
}

// vec4 d4 of the query row at element `base`: zero past head_dim.
fn q_col(base: u32, d4: u32) -> vec4<f32> {
    if (d4 >= p.dp4) {
        return vec4<f32>(0.0);
    }
    return clip(q4(base + 4u * d4), d4, p.head_dim);
}

fn load_row(base: u32) -> Row16 {
    return Row16(
        q_col(base, 0u), q_col(base, 1u), q_col(base, 2u), q_col(base, 3u),
        q_col(base, 4u), q_col(base, 5u), q_col(base, 6u), q_col(base, 7u),
        q_col(base, 8u), q_col(base, 9u), q_col(base, 10u), q_col(base, 11u),
        q_col(base, 12u), q_col(base, 13u), q_col(base, 14u), q_col(base, 15u),
    );
}

// vec4 d4 of key (or value row) kb + j: from the stage (j counted from the staged block), or
// from storage.
fn key_col(kb: u32, j: u32, d4: u32) -> vec4<f32> {
    if (DIRECT) {
        return load_k4(0u, kb + j, d4);
    }
    return k_stage[(kb % SK + j) * D4 + d4];
}

fn value_col(kb: u32, j: u32, c4: u32) -> vec4<f32> {
    if (DIRECT) {
        return load_v4(0u, kb + j, c4);
    }
    return v_stage[(kb % SK + j) * D4 + c4];
}

fn key_mat(kb: u32, d4: u32) -> mat4x4<f32> {
    return mat4x4<f32>(key_col(kb, 0u, d4), key_col(kb, 1u, d4), key_col(kb, 2u, d4), key_col(kb, 3u, d4));
}

fn value_mat(kb: u32, c4: u32) -> mat4x4<f32> {
    return mat4x4<f32>(value_col(kb, 0u, c4), value_col(kb, 1u, c4), value_col(kb, 2u, c4), value_col(kb, 3u, c4));
}

fn load_keys(kb: u32) -> Keys4 {
    return Keys4(
        key_mat(kb, 0u), key_mat(kb, 1u), key_mat(kb, 2u), key_mat(kb, 3u),
        key_mat(kb, 4u), key_mat(kb, 5u), key_mat(kb, 6u), key_mat(kb, 7u),
        key_mat(kb, 8u), key_mat(kb, 9u), key_mat(kb, 10u), key_mat(kb, 11u),
        key_mat(kb, 12u), key_mat(kb, 13u), key_mat(kb, 14u), key_mat(kb, 15u),
    );
}

fn load_values(kb: u32) -> Keys4 {
    return Keys4(
        value_mat(kb, 0u), value_mat(kb, 1u), value_mat(kb, 2u), value_mat(kb, 3u),
        value_mat(kb, 4u), value_mat(kb, 5u), value_mat(kb, 6u), value_mat(kb, 7u),
        value_mat(kb, 8u), value_mat(kb, 9u), value_mat(kb, 10u), value_mat(kb, 11u),
        value_mat(kb, 12u), value_mat(kb, 13u), value_mat(kb, 14u), value_mat(kb, 15u),
    );
}

// The 4 scores q · k_j.
fn scores4(q: Row16, k: Keys4) -> vec4<f32> {
    return ((q.c0 * k.m0 + q.c1 * k.m1) + (q.c2 * k.m2 + q.c3 * k.m3))
        + ((q.c4 * k.m4 + q.c5 * k.m5) + (q.c6 * k.m6 + q.c7 * k.m7))
        + ((q.c8 * k.m8 + q.c9 * k.m9) + (q.c10 * k.m10 + q.c11 * k.m11))
        + ((q.c12 * k.m12 + q.c13 * k.m13) + (q.c14 * k.m14 + q.c15 * k.m15));
}

// o a + Σ_j w_j v_j.
fn scaled_plus_pv(o: Row16, a: f32, w: vec4<f32>, v: Keys4) -> Row16 {
    return Row16(
        o.c0 * a + v.m0 * w, o.c1 * a + v.m1 * w, o.c2 * a + v.m2 * w, o.c3 * a + v.m3 * w,
        o.c4 * a + v.m4 * w, o.c5 * a + v.m5 * w, o.c6 * a + v.m6 * w, o.c7 * a + v.m7 * w,
        o.c8 * a + v.m8 * w, o.c9 * a + v.m9 * w, o.c10 * a + v.m10 * w, o.c11 * a + v.m11 * w,
        o.c12 * a + v.m12 * w, o.c13 * a + v.m13 * w, o.c14 * a + v.m14 * w, o.c15 * a + v.m15 * w,
    );
}

// One row's step over keys kb .. kb + 3, as fused_attention.wgsl's mask_row, exp_row and
// rescaling: `present` says which keys exist and are not padding, `lim` is the row's
// key_limit and `bias_at` where its bias row starts. Without a bias the maximum is over
// unscaled scores times the scale's sign; with one over the logits. Masked scores are LOWEST
// and never enter exp.
fn row_step(st: RowState, q: Row16, k: Keys4, v: Keys4, kb: u32, present: vec4<bool>, lim: u32, bias_at: u32) -> RowState {
    let s = scores4(q, k);
    let j = vec4<u32>(kb) + vec4<u32>(0u, 1u, 2u, 3u);
    var ok = present & (j < vec4<u32>(lim));
    let sg = select(1.0, -1.0, p.scale < 0.0);
    var x = s * sg;
    if (HAS_BIAS && lim > 0u) {
        var b = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            if (j[e] < lkv.n) { b[e] = bias_value(bias_at + j[e]); }
        }
        x = s * p.scale + b;
        ok = ok & !(x < vec4<f32>(LOWEST));
    }
    x = select(vec4<f32>(LOWEST), x, ok);
    let mx = max(st.m, max(max(x.x, x.y), max(x.z, x.w)));
    let w = select(vec4<f32>(0.0), exp_scaled(x - mx), x != vec4<f32>(LOWEST));
    // While every key so far is masked m stays LOWEST and alpha is 1: l and o are still 0.
    let alpha = exp_scaled(vec4<f32>(st.m - mx)).x;
    return RowState(scaled_plus_pv(st.o, alpha, w, v), mx, alpha * st.l + ((w.x + w.y) + (w.z + w.w)));
}

// Where packed row `row` of `mat` starts in Q; 0 past the rows (not read then).
fn q_base(mat: u32, row: u32, rows: u32) -> u32 {
    if (row >= rows) {
        return 0u;
    }
    let a = row_at(mat, row);
    return p.q_offset + a.b * (p.q_sb * lq.n + p.q_sbc) + a.h * (p.q_sh * lq.n + p.q_shc) + a.i * p.q_si;
}

fn row_q(mat: u32, row: u32, rows: u32) -> Row16 {
    if (row >= rows) {
        return row16_zero();
    }
    return load_row(q_base(mat, row, rows));
}

fn col16(x: Row16, c: u32) -> vec4<f32> {
    switch c {
        case 0u: { return x.c0; }
        case 1u: { return x.c1; }
        case 2u: { return x.c2; }
        case 3u: { return x.c3; }
        case 4u: { return x.c4; }
        case 5u: { return x.c5; }
        case 6u: { return x.c6; }
        case 7u: { return x.c7; }
        case 8u: { return x.c8; }
        case 9u: { return x.c9; }
        case 10u: { return x.c10; }
        case 11u: { return x.c11; }
        case 12u: { return x.c12; }
        case 13u: { return x.c13; }
        case 14u: { return x.c14; }
        default: { return x.c15; }
    }
}

// Stores packed row `row`'s output O / l (zero for a row with nothing to attend) and its
// logsumexp for the backward, as fused_attention.wgsl does; nothing past the rows.
fn finish_row(mat: u32, row: u32, rows: u32, st: RowState) {
    if (row >= rows) {
        return;
    }
    let a = row_at(mat, row);
    let base = p.o_offset + a.b * (p.o_sb * lq.n + p.o_sbc) + a.h * (p.o_sh * lq.n + p.o_shc) + a.i * p.o_si;
    let inv = select(0.0, 1.0 / st.l, st.l > 0.0);
    for (var c4 = 0u; c4 < p.dvp4; c4++) {
        let x = col16(st.o, c4) * inv;
        for (var e = 0u; e < 4u; e++) {
            if (4u * c4 + e < p.head_dim_v) {
                store_out(base + 4u * c4 + e, x[e]);
            }
        }
    }
    let unit = select(abs(p.scale), 1.0, HAS_BIAS);
    let lse_row = (a.b * p.kv_heads * p.group + a.h) * lq.n + a.i;
    store_lse(lse_row, select(LOWEST, unit * st.m + log(st.l), st.l > 0.0));
}

fn row_init() -> RowState {
    return RowState(row16_zero(), LOWEST, 0.0);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rows = p.group * lq.n;
    let br = R * WG;
    let q_blocks = (rows + br - 1u) / br;
    let tile = workgroup_index(wid, nwg);
    // The grid is sized for the call's lengths by the host; anything past them does nothing.
    if (tile >= q_blocks * p.batch * p.kv_heads) {
        return;
    }
    let mat = tile / q_blocks;
    let row0 = (tile % q_blocks) * br;
    let b = mat / p.kv_heads;
    let i0 = row0 + R * li;
    k_head = p.k_offset + b * (p.k_sb * lkv.n + p.k_sbc) + (mat % p.kv_heads) * (p.k_sh * lkv.n + p.k_shc);
    v_head = p.v_offset + b * (p.v_sb * lkv.n + p.v_sbc) + (mat % p.kv_heads) * (p.v_sh * lkv.n + p.v_shc);

    // This invocation's rows (members past R stay unused and compile away): their Q, how far
    // each may see, where each one's bias starts.
    let qr0 = row_q(mat, i0, rows);
    var qr1 = row16_zero();
    var qr2 = row16_zero();
    var qr3 = row16_zero();
    var qr4 = row16_zero();
    var qr5 = row16_zero();
    var qr6 = row16_zero();
    var qr7 = row16_zero();
    if (R > 1u) { qr1 = row_q(mat, i0 + 1u, rows); }
    if (R > 2u) { qr2 = row_q(mat, i0 + 2u, rows); }
    if (R > 3u) { qr3 = row_q(mat, i0 + 3u, rows); }
    if (R > 4u) { qr4 = row_q(mat, i0 + 4u, rows); }
    if (R > 5u) { qr5 = row_q(mat, i0 + 5u, rows); }
    if (R > 6u) { qr6 = row_q(mat, i0 + 6u, rows); }
    if (R > 7u) { qr7 = row_q(mat, i0 + 7u, rows); }
    var lim: array<u32, 8>;
    var bias_at: array<u32, 8>;
    var my_end = 0u;
    for (var r = 0u; r < R; r++) {
        lim[r] = key_limit(mat, i0 + r);
        my_end = max(my_end, lim[r]);
        bias_at[r] = select(0u, bias_row(mat, i0 + r), HAS_BIAS && i0 + r < rows);
    }
    var s0 = row_init();
    var s1 = row_init();
    var s2 = row_init();
    var s3 = row_init();
    var s4 = row_init();
    var s5 = row_init();
    var s6 = row_init();
    var s7 = row_init();

    // The keys any row of the workgroup may see (uniform, for the barriers): a block of rows
    // within one head reaches up to its last row's limit; one that spans heads the last query's.
    let last = min(row0 + br, rows) - 1u;
    var key_end = key_limit(mat, last);
    if (row0 / lq.n != last / lq.n) {
        key_end = key_limit(mat, lq.n - 1u);
    }

    for (var k0 = 0u; k0 < key_end; k0 += SK) {
        if (!DIRECT) {
            for (var e = li; e < SK * D4; e += WG) {
                k_stage[e] = load_k4(mat, k0 + e / D4, e % D4);
                v_stage[e] = load_v4(mat, k0 + e / D4, e % D4);
            }
            workgroupBarrier();
        }
        for (var kb = k0; kb < min(k0 + SK, my_end); kb += 4u) {
            var present = vec4<bool>(false);
            for (var e = 0u; e < 4u; e++) {
                present[e] = kb + e < lkv.n && key_kept(b, kb + e);
            }
            let k = load_keys(kb);
            let v = load_values(kb);
            s0 = row_step(s0, qr0, k, v, kb, present, lim[0], bias_at[0]);
            if (R > 1u) { s1 = row_step(s1, qr1, k, v, kb, present, lim[1], bias_at[1]); }
            if (R > 2u) { s2 = row_step(s2, qr2, k, v, kb, present, lim[2], bias_at[2]); }
            if (R > 3u) { s3 = row_step(s3, qr3, k, v, kb, present, lim[3], bias_at[3]); }
            if (R > 4u) { s4 = row_step(s4, qr4, k, v, kb, present, lim[4], bias_at[4]); }
            if (R > 5u) { s5 = row_step(s5, qr5, k, v, kb, present, lim[5], bias_at[5]); }
            if (R > 6u) { s6 = row_step(s6, qr6, k, v, kb, present, lim[6], bias_at[6]); }
            if (R > 7u) { s7 = row_step(s7, qr7, k, v, kb, present, lim[7], bias_at[7]); }
        }
        if (!DIRECT) {
            workgroupBarrier();
        }
    }

    finish_row(mat, i0, rows, s0);
    if (R > 1u) { finish_row(mat, i0 + 1u, rows, s1); }
    if (R > 2u) { finish_row(mat, i0 + 2u, rows, s2); }
    if (R > 3u) { finish_row(mat, i0 + 3u, rows, s3); }
    if (R > 4u) { finish_row(mat, i0 + 4u, rows, s4); }
    if (R > 5u) { finish_row(mat, i0 + 5u, rows, s5); }
    if (R > 6u) { finish_row(mat, i0 + 6u, rows, s6); }
    if (R > 7u) { finish_row(mat, i0 + 7u, rows, s7); }
}
