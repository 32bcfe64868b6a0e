//! The stages a plan dispatches, as one type: the identity of a stage in the plan's step list,
//! its timing and its debug-group label.

use std::fmt;

/// One dispatch of an attention plan.
///
/// ```
/// use wgpu_attention::Stage;
/// assert_eq!(Stage::Projection.to_string(), "project q, k, v");
/// assert!(Stage::OutputProjection.is_projection());
/// assert!(!Stage::FusedAttention.is_projection());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `x @ [W_q | W_k | W_v] + b`, split into heads (`gemm.wgsl`).
    Projection,
    /// `scale · Q Kᵀ`, masked (`scores.wgsl`; staged path).
    Scores,
    /// The row softmax in place (`softmax.wgsl`; staged path).
    Softmax,
    /// `P V`, heads concatenated (`weighted_sum.wgsl`; staged path).
    WeightedSum,
    /// Scores, online softmax and `P V` in one kernel (`fused_attention.wgsl`).
    FusedAttention,
    /// `heads @ W_o + b_o` (`gemm.wgsl`).
    OutputProjection,
}

impl Stage {
    /// Every stage, in the order a plan can run them.
    pub const ALL: [Stage; 6] = [
        Stage::Projection,
        Stage::Scores,
        Stage::Softmax,
        Stage::WeightedSum,
        Stage::FusedAttention,
        Stage::OutputProjection,
    ];

    /// The stage's name in reports, debug groups and GPU captures.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Projection => "project q, k, v",
            Stage::Scores => "scores",
            Stage::Softmax => "softmax",
            Stage::WeightedSum => "weighted sum",
            Stage::FusedAttention => "fused attention",
            Stage::OutputProjection => "output projection",
        }
    }

    /// Whether the stage is a matrix product with weights rather than attention itself.
    pub fn is_projection(self) -> bool {
        matches!(self, Stage::Projection | Stage::OutputProjection)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
