//! Where each kernel's WGSL comes from: the files of `shaders/` it joins (the dispatch prologue,
//! shared helpers, the storage includes of its variant, then its own file), composed once per
//! kernel and process.

use super::Kernel;
use crate::precision::Precision;

impl Kernel {
    /// The kernel's own WGSL file, as written.
    pub fn file_source(self) -> &'static str {
        shader_file(self.file_name())
    }

    /// The module compiled: the dispatch-chunk prologue of `shaders/dispatch.wgsl` ahead of
    /// every kernel, the register-tile helpers of `shaders/tiles.wgsl` ahead of the kernels that
    /// use them, the score tile of `shaders/score_tile.wgsl` ahead of the two that compute
    /// scores, the staged kernels' shared geometry of `shaders/staged_io.wgsl` ahead of each of
    /// them, and the fused kernel's binding includes (`shaders/fused_io_*.wgsl`) for its
    /// variant (split-K decode reads Q, K and V through the same ones, and its combine stores
    /// through `shaders/decode_io_out*.wgsl`; the staged scores and weighted sum load and store
    /// through `shaders/staged_io_qk*.wgsl` and `shaders/staged_io_v_out*.wgsl`).
    /// Storage variants take their bindings and element access from `*_f16.wgsl` includes,
    /// and f16 modules open with `shaders/f16.wgsl` (`enable f16;` must precede every
    /// declaration).
    pub fn source(self) -> &'static str {
        self.composition().0
    }

    /// The files `source` joins, in order, as (file name, text), each followed there by a
    /// newline, so that a compiler's line number can be traced to its file.
    #[doc(hidden)]
    pub fn parts(self) -> &'static [(&'static str, &'static str)] {
        self.composition().1
    }

    /// The composed source and its parts, from one list of files per kernel; joined once per
    /// kernel and process (a few dozen kilobytes in all), so every caller shares one string.
    fn composition(self) -> (&'static str, &'static [(&'static str, &'static str)]) {
        type Composed = (&'static str, &'static [(&'static str, &'static str)]);
        static COMPOSED: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<Kernel, Composed>>,
        > = std::sync::OnceLock::new();
        let mut composed = COMPOSED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *composed.entry(self).or_insert_with(|| {
            let parts: Vec<(&'static str, &'static str)> = self
                .files()
                .into_iter()
                .map(|f| (f, shader_file(f)))
                .collect();
            let source: String = parts.iter().map(|(_, text)| format!("{text}\n")).collect();
            (
                Box::leak(source.into_boxed_str()),
                Box::leak(parts.into_boxed_slice()),
            )
        })
    }

    /// The files a kernel is composed of, its own last.
    fn files(self) -> Vec<&'static str> {
        let mut files = match self.precision() {
            Precision::F32 => vec!["dispatch.wgsl"],
            Precision::F16 => vec!["f16.wgsl", "dispatch.wgsl"],
        };
        match self {
            Kernel::Gemm(p) | Kernel::GemmCache(p) => files.extend([
                "tiles.wgsl",
                match p {
                    Precision::F32 => "gemm_io_f32.wgsl",
                    Precision::F16 => "gemm_io_f16.wgsl",
                },
                if let Kernel::GemmCache(_) = self {
                    "gemm_rows_cache.wgsl"
                } else {
                    "gemm_rows_packed.wgsl"
                },
            ]),
            Kernel::Scores(precision) => files.extend([
                "tiles.wgsl",
                "score_tile.wgsl",
                "staged_io.wgsl",
                match precision {
                    Precision::F32 => "staged_io_qk.wgsl",
                    Precision::F16 => "staged_io_qk_f16.wgsl",
                },
            ]),
            Kernel::Softmax => files.extend(["staged_io.wgsl"]),
            Kernel::WeightedSum(precision) => files.extend([
                "tiles.wgsl",
                "staged_io.wgsl",
                match precision {
                    Precision::F32 => "staged_io_v_out.wgsl",
                    Precision::F16 => "staged_io_v_out_f16.wgsl",
                },
            ]),
            Kernel::BackwardPrep => files.extend(["fused_params.wgsl", "unaligned.wgsl"]),
            Kernel::BackwardKv | Kernel::BackwardQ => {
                files.extend(["fused_params.wgsl", "unaligned.wgsl", "attention_bwd.wgsl"])
            }
            Kernel::Fused(io) => {
                files.extend(["tiles.wgsl", "score_tile.wgsl"]);
                files.extend(io.files());
                files.extend(FUSED_COMMON);
            }
            Kernel::FusedRows(io) => {
                files.extend(io.files());
                files.extend(FUSED_COMMON);
            }
            // Q, K and V through the fused kernel's loads (the same slots, the same q_at).
            Kernel::DecodeSplit { mask, precision } => files.extend([
                match precision {
                    Precision::F32 => "fused_io_qkv.wgsl",
                    Precision::F16 => "fused_io_qkv_f16.wgsl",
                },
                if mask {
                    "decode_keys_mask.wgsl"
                } else {
                    "decode_keys_all.wgsl"
                },
                "unaligned.wgsl",
                "qkv_unaligned.wgsl",
            ]),
            Kernel::DecodeCombine(Precision::F32) => files.push("decode_io_out.wgsl"),
            Kernel::DecodeCombine(Precision::F16) => files.push("decode_io_out_f16.wgsl"),
            Kernel::StreamRead => {}
        }
        files.push(self.file_name());
        files
    }
}

/// What both fused kernels include after their io files: the forward's parameters, unaligned
/// vec4 loads (of any tensor, then of Q, K and V), and their shared geometry and masks.
const FUSED_COMMON: [&str; 4] = [
    "fused_params.wgsl",
    "unaligned.wgsl",
    "qkv_unaligned.wgsl",
    "fused_common.wgsl",
];

/// A file of `shaders/`, by name.
fn shader_file(name: &str) -> &'static str {
    macro_rules! files {
        ($($file:literal),+ $(,)?) => {
            match name {
                $($file => include_str!(concat!("../../shaders/", $file)),)+
                _ => unreachable!("{name} is not listed in kernels::shader_file"),
            }
        };
    }
    files!(
        "f16.wgsl",
        "dispatch.wgsl",
        "fused_params.wgsl",
        "unaligned.wgsl",
        "qkv_unaligned.wgsl",
        "tiles.wgsl",
        "score_tile.wgsl",
        "staged_io.wgsl",
        "staged_io_qk.wgsl",
        "staged_io_qk_f16.wgsl",
        "staged_io_v_out.wgsl",
        "staged_io_v_out_f16.wgsl",
        "gemm_io_f32.wgsl",
        "gemm_io_f16.wgsl",
        "gemm_rows_packed.wgsl",
        "gemm_rows_cache.wgsl",
        "gemm.wgsl",
        "scores.wgsl",
        "softmax.wgsl",
        "weighted_sum.wgsl",
        "fused_io_qkv.wgsl",
        "fused_io_qkv_packed.wgsl",
        "fused_io_mask.wgsl",
        "fused_io_no_mask.wgsl",
        "fused_io_bias.wgsl",
        "fused_io_no_bias.wgsl",
        "fused_io_qkv_f16.wgsl",
        "fused_io_qkv_packed_f16.wgsl",
        "fused_io_out.wgsl",
        "fused_io_out_f16.wgsl",
        "fused_io_lse.wgsl",
        "fused_io_no_lse.wgsl",
        "fused_common.wgsl",
        "fused_attention.wgsl",
        "fused_rows.wgsl",
        "attention_bwd.wgsl",
        "attention_bwd_prep.wgsl",
        "attention_bwd_kv.wgsl",
        "attention_bwd_q.wgsl",
        "decode_keys_mask.wgsl",
        "decode_keys_all.wgsl",
        "decode_split.wgsl",
        "decode_io_out.wgsl",
        "decode_io_out_f16.wgsl",
        "decode_combine.wgsl",
        "stream_read.wgsl",
    )
}
