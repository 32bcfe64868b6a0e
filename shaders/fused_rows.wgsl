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
// memory and no barrier for the softmax. Per block of KB keys every loaded vec4 of K feeds R
// rows' dot products and every vec4 of V R rows' outputs: about R x 4 multiply-adds per load,
// against 8 x 4 for fused_attention.wgsl's shared tiles but without their staging of Q, their
// P round trip and their reductions.
//
// Bindings: those of fused_attention.wgsl (group 0: 0 p, 1-3 or 1 Q/K/V, 4 key_mask,
// 5 bias, 6 out, 7 lq, 8 lkv, 9 lse, as the io includes chosen by `FusedIo` declare them;
// group 1: dispatch.wgsl's chunk index).
//
// Layout: a workgroup of WG invocations owns R WG consecutive packed rows of one (batch,
// kv head); invocation t owns rows R t .. R t + R - 1. Each row's Q and O are D4 vec4 wide
// (D4 a power of two covering both padded head widths; vec4s past a width stay zero), held in
// private arrays of REGS vec4 (R D4 <= REGS, checked by the host). Keys go in blocks of KB (a
// multiple of 4); K and V of a block are either read straight from storage by every invocation
// (DIRECT, no barrier: what suits a device whose workgroup memory costs as much as a buffer
// read) or staged once per workgroup in workgroup memory (KB D4 vec4 each) and read from there.
// With causal masking the workgroup stops after the last key its rows may see, and an
// invocation skips the blocks past its own rows' last key. The workgroup index comes from
// dispatch.wgsl (folded grids, chunked dispatches).

override WG: u32 = 32u;        // invocations per workgroup
override R: u32 = 8u;          // packed rows per invocation (at most 8, R D4 <= REGS)
override KB: u32 = 8u;         // keys per block (a multiple of 4, at most 16)
override D4: u32 = 16u;        // vec4 columns of a row of Q, K, V or O (a power of two)
override DIRECT: bool = false; // read K and V from storage rather than staging them

// Private vec4s for one invocation's Q, and again for its O.
const REGS: u32 = 128u;

var<workgroup> k_stage: array<vec4<f32>, KB * D4>;
var<workgroup> v_stage: array<vec4<f32>, KB * D4>;

// vec4 d4 of key kb + j: from the stage, or from storage.
fn key4(kb: u32, j: u32, d4: u32) -> vec4<f32> {
    if (DIRECT) {
        return load_k4(0u, kb + j, d4);
    }
    return k_stage[j * D4 + d4];
}

fn value4(kb: u32, j: u32, c4: u32) -> vec4<f32> {
    if (DIRECT) {
        return load_v4(0u, kb + j, c4);
    }
    return v_stage[j * D4 + c4];
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

    // This invocation's rows: their Q, how far each may see, where each one's bias starts.
    var qr: array<vec4<f32>, REGS>;
    var o: array<vec4<f32>, REGS>;
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    var lim: array<u32, 8>;
    var bias_at: array<u32, 8>;
    var my_end = 0u;
    for (var r = 0u; r < R; r++) {
        let row = i0 + r;
        lim[r] = key_limit(mat, row);
        my_end = max(my_end, lim[r]);
        m[r] = LOWEST;
        if (row < rows) {
            bias_at[r] = select(0u, bias_row(mat, row), HAS_BIAS);
            let a = row_at(mat, row);
            let base = p.q_offset + a.b * (p.q_sb * lq.n + p.q_sbc) + a.h * (p.q_sh * lq.n + p.q_shc) + a.i * p.q_si;
            for (var d4 = 0u; d4 < D4; d4++) {
                if (d4 < p.dp4) {
                    qr[r * D4 + d4] = clip(q4(base + 4u * d4), d4, p.head_dim);
                }
            }
        }
    }

    // The keys any row of the workgroup may see (uniform, for the barriers): a block of rows
    // within one head reaches up to its last row's limit; one that spans heads the last query's.
    let last = min(row0 + br, rows) - 1u;
    var key_end = key_limit(mat, last);
    if (row0 / lq.n != last / lq.n) {
        key_end = key_limit(mat, lq.n - 1u);
    }
    let sg = select(1.0, -1.0, p.scale < 0.0);

    for (var kb = 0u; kb < key_end; kb += KB) {
        if (!DIRECT) {
            for (var e = li; e < KB * D4; e += WG) {
                k_stage[e] = load_k4(mat, kb + e / D4, e % D4);
                v_stage[e] = load_v4(mat, kb + e / D4, e % D4);
            }
            workgroupBarrier();
        }
        if (kb < my_end) {
            // Which keys of the block exist and are not padding (causality is per row).
            var present: array<bool, 16>;
            for (var j = 0u; j < KB; j++) {
                present[j] = kb + j < lkv.n && key_kept(b, kb + j);
            }
            // 1. Scores: s[r KB/4 + j4] holds keys 4 j4 .. 4 j4 + 3 of row r.
            var s: array<vec4<f32>, 32>;
            for (var j4 = 0u; j4 < KB / 4u; j4++) {
                for (var d4 = 0u; d4 < D4; d4++) {
                    let k0 = key4(kb, 4u * j4, d4);
                    let k1 = key4(kb, 4u * j4 + 1u, d4);
                    let k2 = key4(kb, 4u * j4 + 2u, d4);
                    let k3 = key4(kb, 4u * j4 + 3u, d4);
                    for (var r = 0u; r < R; r++) {
                        let q = qr[r * D4 + d4];
                        s[r * (KB / 4u) + j4] += vec4<f32>(dot(q, k0), dot(q, k1), dot(q, k2), dot(q, k3));
                    }
                }
            }
            // 2. Online softmax, row by row, as fused_attention.wgsl's mask_row and exp_row:
            // maxima over unscaled scores times the scale's sign (logits with a bias), masked
            // scores set to LOWEST and kept out of exp.
            for (var r = 0u; r < R; r++) {
                var mx = m[r];
                for (var j4 = 0u; j4 < KB / 4u; j4++) {
                    let at = r * (KB / 4u) + j4;
                    var x = s[at] * sg;
                    for (var e = 0u; e < 4u; e++) {
                        let key = kb + 4u * j4 + e;
                        var ok = present[4u * j4 + e] && key < lim[r];
                        if (HAS_BIAS && ok) {
                            x[e] = s[at][e] * p.scale + bias_value(bias_at[r] + key);
                            ok = !(x[e] < LOWEST);
                        }
                        x[e] = select(LOWEST, x[e], ok);
                    }
                    s[at] = x;
                    mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
                }
                var sum = vec4<f32>(0.0);
                for (var j4 = 0u; j4 < KB / 4u; j4++) {
                    let at = r * (KB / 4u) + j4;
                    let w = select(vec4<f32>(0.0), exp_scaled(s[at] - mx), s[at] != vec4<f32>(LOWEST));
                    s[at] = w;
                    sum += w;
                }
                // While every key so far is masked m stays LOWEST and alpha is 1: l, o are 0.
                let alpha = exp_scaled(vec4<f32>(m[r] - mx)).x;
                l[r] = alpha * l[r] + ((sum.x + sum.y) + (sum.z + sum.w));
                m[r] = mx;
                for (var c4 = 0u; c4 < D4; c4++) {
                    o[r * D4 + c4] *= alpha;
                }
            }
            // 3. O += P V: each vec4 of V feeds R rows.
            for (var j4 = 0u; j4 < KB / 4u; j4++) {
                for (var c4 = 0u; c4 < D4; c4++) {
                    let v0 = value4(kb, 4u * j4, c4);
                    let v1 = value4(kb, 4u * j4 + 1u, c4);
                    let v2 = value4(kb, 4u * j4 + 2u, c4);
                    let v3 = value4(kb, 4u * j4 + 3u, c4);
                    for (var r = 0u; r < R; r++) {
                        let w = s[r * (KB / 4u) + j4];
                        o[r * D4 + c4] += w.x * v0 + w.y * v1 + w.z * v2 + w.w * v3;
                    }
                }
            }
        }
        if (!DIRECT) {
            workgroupBarrier();
        }
    }

    // O divided by the running sum once; the logsumexp for the backward as in
    // fused_attention.wgsl (a call that compiles to nothing with fused_io_no_lse.wgsl).
    let unit = select(abs(p.scale), 1.0, HAS_BIAS);
    for (var r = 0u; r < R; r++) {
        let row = i0 + r;
        if (row < rows) {
            let a = row_at(mat, row);
            let base = p.o_offset + a.b * (p.o_sb * lq.n + p.o_sbc) + a.h * (p.o_sh * lq.n + p.o_shc) + a.i * p.o_si;
            // A query with nothing to attend has l = 0 and o = 0: its output is zero.
            let inv = select(0.0, 1.0 / l[r], l[r] > 0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                let x = o[r * D4 + c4] * inv;
                for (var e = 0u; e < 4u; e++) {
                    if (4u * c4 + e < p.head_dim_v) {
                        store_out(base + 4u * c4 + e, x[e]);
                    }
                }
            }
            let lse_row = (a.b * p.kv_heads * p.group + a.h) * lq.n + a.i;
            store_lse(lse_row, select(LOWEST, unit * m[r] + log(l[r]), l[r] > 0.0));
        }
    }
}
