//! Reads `model.safetensors` into burn tensors, by HuggingFace name, checking each shape.
//!
//! Names are looked up with the checkpoint's prefix (`bert.` for `BertForMaskedLM` files,
//! none for bare `BertModel` files). PyTorch stores a Linear weight as `[out, in]`; burn's
//! `Linear` wants `[in, out]`, so those are transposed here, once, on the host. Values are read
//! as f32 and created on the device in the model's float type (`model.dtype`).

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::DType;
use safetensors::{Dtype, SafeTensors};

use super::LoadError;

/// An open checkpoint file.
pub struct Weights<'a> {
    file: PathBuf,
    tensors: SafeTensors<'a>,
    /// `bert.`, `roberta.` or empty: the prefix of the encoder's tensor names.
    prefix: &'static str,
    device: Device,
    /// The float type every tensor is created in.
    dtype: DType,
}

impl<'a> Weights<'a> {
    /// Parses the safetensors header of `bytes` (the contents of `file`); tensors will be
    /// created on `device` as `dtype`.
    pub fn parse(
        file: &Path,
        bytes: &'a [u8],
        device: &Device,
        dtype: DType,
    ) -> Result<Self, LoadError> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| LoadError::Invalid {
            file: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        // The base model's attribute name in task checkpoints (`BertForMaskedLM.bert`,
        // `RobertaForSequenceClassification.roberta`); none in bare model files.
        let prefix = ["bert.", "roberta."]
            .into_iter()
            .find(|prefix| {
                tensors
                    .tensor(&format!("{prefix}embeddings.word_embeddings.weight"))
                    .is_ok()
            })
            .unwrap_or("");
        Ok(Weights {
            file: file.to_path_buf(),
            tensors,
            prefix,
            device: device.clone(),
            dtype,
        })
    }

    /// Whether a tensor with exactly this name exists.
    pub fn has_exact(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok()
    }

    /// A tensor of the file, or the error naming it.
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>, LoadError> {
        self.tensors
            .tensor(name)
            .map_err(|_| LoadError::MissingTensor {
                file: self.file.clone(),
                name: name.to_string(),
            })
    }

    /// The first dimension of a tensor (a Linear's output width, say).
    pub fn rows(&self, name: &str) -> Result<usize, LoadError> {
        self.view(name)?
            .shape()
            .first()
            .copied()
            .ok_or_else(|| LoadError::Invalid {
                file: self.file.clone(),
                reason: format!("tensor `{name}` has no dimensions"),
            })
    }

    /// The encoder's name for a tensor (with the checkpoint's prefix).
    pub fn encoder_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The f32 values of a tensor whose shape must be `shape`.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let view = self.view(name)?;
        if view.shape() != shape {
            return Err(LoadError::Shape {
                file: self.file.clone(),
                name: name.to_string(),
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(LoadError::Invalid {
                file: self.file.clone(),
                reason: format!(
                    "tensor `{name}` is {:?}; only F32 checkpoints are supported",
                    view.dtype()
                ),
            });
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A tensor of `values` in the model's float type on its device.
    fn tensor<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), (&self.device, self.dtype))
    }

    /// A 1-d tensor.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor<1>, LoadError> {
        let values = self.values(name, &[len])?;
        Ok(self.tensor(values, [len]))
    }

    /// A 2-d tensor as stored.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, LoadError> {
        let values = self.values(name, &[rows, cols])?;
        Ok(self.tensor(values, [rows, cols]))
    }

    /// A 2-d tensor stored `[rows, cols]`, returned transposed as a contiguous `[cols, rows]`.
    pub fn matrix_transposed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor<2>, LoadError> {
        let values = self.values(name, &[rows, cols])?;
        Ok(self.tensor(transpose(&values, rows, cols), [cols, rows]))
    }

    /// A PyTorch `Linear(d_in, d_out)` named `{name}.weight` / `{name}.bias`.
    pub fn linear(&self, name: &str, d_in: usize, d_out: usize) -> Result<Linear, LoadError> {
        self.linear_fused(&[name], d_in, d_out)
    }

    /// Several PyTorch Linears with the same input, fused into one `[d_in, n * d_out]` Linear
    /// (outputs concatenated in order): one matmul instead of n.
    pub fn linear_fused(
        &self,
        names: &[&str],
        d_in: usize,
        d_out: usize,
    ) -> Result<Linear, LoadError> {
        let width = names.len() * d_out;
        let mut weight = vec![0f32; d_in * width];
        let mut bias = Vec::with_capacity(width);
        for (part, name) in names.iter().enumerate() {
            let w = self.values(&format!("{name}.weight"), &[d_out, d_in])?;
            for (o, row) in w.chunks_exact(d_in).enumerate() {
                for (i, value) in row.iter().enumerate() {
                    weight[i * width + part * d_out + o] = *value;
                }
            }
            bias.extend(self.values(&format!("{name}.bias"), &[d_out])?);
        }
        Ok(Linear {
            weight: Param::from_tensor(self.tensor(weight, [d_in, width])),
            bias: Some(Param::from_tensor(self.tensor(bias, [width]))),
        })
    }

    /// A LayerNorm named `{name}.weight` / `{name}.bias` (older files: `gamma` / `beta`).
    pub fn layer_norm(&self, name: &str, d: usize, eps: f64) -> Result<LayerNorm, LoadError> {
        let (gamma, beta) = if self.has_exact(&format!("{name}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(&self.device);
        norm.gamma = Param::from_tensor(self.vector(&format!("{name}.{gamma}"), d)?);
        norm.beta = Some(Param::from_tensor(
            self.vector(&format!("{name}.{beta}"), d)?,
        ));
        Ok(norm)
    }

    /// An embedding table `[n, d]`.
    pub fn embedding(&self, name: &str, n: usize, d: usize) -> Result<Embedding, LoadError> {
        Ok(Embedding {
            weight: Param::from_tensor(self.matrix(name, n, d)?),
        })
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
