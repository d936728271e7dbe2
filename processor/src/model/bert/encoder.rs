//! The BERT encoder: N layers of self-attention (with a padding mask) and a GELU
//! feed-forward block, each followed by a residual connection and LayerNorm (post-norm).

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::config::BertConfig;
use super::cpu::{CpuEncoder, CpuLayer};
use super::weights::Weights;
use super::LoadError;

/// One `encoder.layer.N`.
struct EncoderLayer {
    /// query, key and value projections fused: `[hidden, 3 * hidden]`.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// `encoder.layer.*`.
pub struct BertEncoder {
    layers: Vec<EncoderLayer>,
    heads: usize,
}

/// Which keys each query may attend to, in the form the attention implementation takes.
#[derive(Clone)]
pub enum KeyMask {
    /// `[batch, 1, 1, len]`: 0 for real tokens, a large negative number for padding, added to
    /// the scores of the explicit attention.
    Bias(Tensor<4>),
    /// `[batch, heads, len, len]` (a broadcast view): `true` where the key is padding, for
    /// burn's fused attention op.
    Padding(Tensor<4, Bool>),
}

impl BertEncoder {
    /// Loads every layer named in the config.
    pub fn load(weights: &Weights<'_>, config: &BertConfig) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let name = |n: &str| weights.encoder_name(&format!("encoder.layer.{i}.{n}"));
                let (q, k, v) = (
                    name("attention.self.query"),
                    name("attention.self.key"),
                    name("attention.self.value"),
                );
                Ok(EncoderLayer {
                    qkv: weights.linear_fused(&[&q, &k, &v], h, h)?,
                    attention_out: weights.linear(&name("attention.output.dense"), h, h)?,
                    attention_norm: weights.layer_norm(
                        &name("attention.output.LayerNorm"),
                        h,
                        eps,
                    )?,
                    intermediate: weights.linear(
                        &name("intermediate.dense"),
                        h,
                        config.intermediate_size,
                    )?,
                    output: weights.linear(&name("output.dense"), config.intermediate_size, h)?,
                    output_norm: weights.layer_norm(&name("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<_, LoadError>>()?;
        Ok(BertEncoder {
            layers,
            heads: config.num_attention_heads,
        })
    }

    /// Attention heads per layer.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// The same layers as the fused CPU encoder (f32 on the flex device): the parameters
    /// are read back once, and the burn modules dropped.
    pub fn into_cpu(self, config: &BertConfig) -> CpuEncoder {
        fn values(tensor: Tensor<1>) -> Vec<f32> {
            tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32 parameters")
        }
        fn matrix(linear: &Linear) -> (Vec<f32>, Vec<f32>) {
            let weight = linear.weight.val();
            let n = weight.shape().num_elements();
            let bias = linear
                .bias
                .as_ref()
                .expect("BERT linears have a bias")
                .val();
            (values(weight.reshape([n])), values(bias))
        }
        fn norm(norm: &LayerNorm) -> (Vec<f32>, Vec<f32>) {
            let beta = norm
                .beta
                .as_ref()
                .expect("BERT LayerNorms have a bias")
                .val();
            (values(norm.gamma.val()), values(beta))
        }
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let (qkv_weight, qkv_bias) = matrix(&layer.qkv);
                let (attention_out_weight, attention_out_bias) = matrix(&layer.attention_out);
                let (intermediate_weight, intermediate_bias) = matrix(&layer.intermediate);
                let (output_weight, output_bias) = matrix(&layer.output);
                CpuLayer {
                    qkv_weight,
                    qkv_bias,
                    attention_out_weight,
                    attention_out_bias,
                    attention_norm: norm(&layer.attention_norm),
                    intermediate_weight,
                    intermediate_bias,
                    output_weight,
                    output_bias,
                    output_norm: norm(&layer.output_norm),
                }
            })
            .collect();
        CpuEncoder::new(
            layers,
            config.hidden_size,
            config.num_attention_heads,
            config.layer_norm_eps,
        )
    }

    /// `x`: `[batch, len, hidden]`; `mask` keeps every token from attending to padding.
    pub fn forward(&self, mut x: Tensor<3>, mask: &KeyMask) -> Tensor<3> {
        for layer in &self.layers {
            x = layer.forward(x, mask, self.heads);
        }
        x
    }
}

impl EncoderLayer {
    fn forward(&self, x: Tensor<3>, mask: &KeyMask, heads: usize) -> Tensor<3> {
        let [batch, len, hidden] = x.dims();
        let head_dim = hidden / heads;
        // [batch, len, 3, heads, head_dim] → three [batch, heads, len, head_dim]
        let qkv = self
            .qkv
            .forward(x.clone())
            .reshape([batch, len, 3, heads, head_dim]);
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i, 1)
                .reshape([batch, len, heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let context = match mask {
            KeyMask::Bias(bias) => {
                let scores = q
                    .matmul(k.swap_dims(2, 3))
                    .div_scalar((head_dim as f64).sqrt())
                    + bias.clone();
                softmax(scores, 3).matmul(v)
            }
            // Scale 1/sqrt(head_dim) is the op's default.
            KeyMask::Padding(padding) => attention(
                q,
                k,
                v,
                Some(padding.clone()),
                None,
                AttentionModuleOptions::default(),
            ),
        };
        let context = context.swap_dims(1, 2).reshape([batch, len, hidden]);
        let x = self
            .attention_norm
            .forward(self.attention_out.forward(context) + x);
        let ffn = self
            .output
            .forward(gelu(self.intermediate.forward(x.clone())));
        self.output_norm.forward(ffn + x)
    }
}
