// Contract: the includer declares overrides TX, TY and DK, a uniform `p` with dp4, functions load_q4 and load_k4, and the workgroup array `stage`; tiles.wgsl comes first.
//
// One tile of scores, S = Q Kᵀ, for 8 TY queries by 8 TX keys of one head: the work the score
// kernel and the fused kernel share; the host puts this file, after tiles.wgsl, ahead of both.
// Not a kernel: no bindings of its own. Each includer declares the overrides TX, TY and DK,
// the uniform `p` (with dp4, the vec4 columns of a row), the workgroup array `stage`, at least
// (8 TY + 8 TX) (DK/4 + 1) vec4 long, and the loads `load_q4(mat, row, d4)` and
// `load_k4(mat, key, d4)`: vec4 d4 of a query or key row of matrix `mat` (a batch and head),
// zero past the rows and columns that exist. The loads hide the includer's layout.
//
// Q rows row0 .. and K rows col0 .. of matrix `mat` are staged DK columns at a time into `stage`,
// rows padded to DK/4 + 1 vec4 so eight neighbouring rows fall in distinct banks. Invocation
// (tx, ty) accumulates queries 8 ty .. 8 ty + 7 against keys tx + TX j (interleaved, so
// neighbours read neighbouring rows of K); every loaded vec4 feeds eight dot products. Call it
// in uniform control flow: it has barriers.
fn score_tile(mat: u32, row0: u32, col0: u32, tx: u32, ty: u32, li: u32) -> Scores8 {
    let bm = 8u * TY;
    let bn = 8u * TX;
    let dk4 = DK / 4u;
    let stride = dk4 + 1u;
    let k_at = bm * stride;
    let r0 = 8u * ty;
    var s = scores_zero();
    for (var d0 = 0u; d0 < 4u * p.dp4; d0 += DK) {
        for (var e = li; e < (bm + bn) * dk4; e += TX * TY) {
            let r = e / dk4;
            let d4 = d0 / 4u + e % dk4;
            var v: vec4<f32>;
            if (r < bm) {
                v = load_q4(mat, row0 + r, d4);
            } else {
                v = load_k4(mat, col0 + r - bm, d4);
            }
            stage[r * stride + e % dk4] = v;
        }
        workgroupBarrier();
        for (var d4 = 0u; d4 < dk4; d4++) {
            let q = r0 * stride + d4;
            let k = k_at + tx * stride + d4;
            let ks = TX * stride;
            s = qk8(
                s,
                Col8(stage[q], stage[q + stride], stage[q + 2u * stride], stage[q + 3u * stride],
                    stage[q + 4u * stride], stage[q + 5u * stride], stage[q + 6u * stride],
                    stage[q + 7u * stride]),
                K8(stage[k], stage[k + ks], stage[k + 2u * ks], stage[k + 3u * ks],
                    stage[k + 4u * ks], stage[k + 5u * ks], stage[k + 6u * ks], stage[k + 7u * ks]),
            );
        }
        workgroupBarrier();
    }
    return s;
}
