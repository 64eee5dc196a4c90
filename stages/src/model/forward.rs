//! The forward pass: front-end, encoder blocks, decoder and loss predictor (method §1–§2).

use super::config::*;
use super::fused::{gelu, softmax_with_bias};
use super::ops::*;
use candle_core::{DType, Device, Tensor, D};

/// The model's forward functions over a weight map.
pub struct Model<'a> {
    pub cfg: &'a ModelConfig,
    pub w: &'a Weights,
}

/// What the teacher produces for a batch (§1.3–1.4).
pub struct TeacherOut {
    /// `[B, T, D]` targets.
    pub targets: Tensor,
    /// `[B, T]` predicted per-frame losses.
    pub pred_loss: Tensor,
}

impl<'a> Model<'a> {
    pub fn new(cfg: &'a ModelConfig, w: &'a Weights) -> Self {
        Model { cfg, w }
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.w
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("model weight `{name}` missing")))
    }

    fn ln(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        layer_norm(
            x,
            Some((
                self.get(&format!("{p}.weight"))?,
                self.get(&format!("{p}.bias"))?,
            )),
            1e-5,
        )
    }

    fn lin(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        linear(
            x,
            self.get(&format!("{p}.weight"))?,
            Some(self.get(&format!("{p}.bias"))?),
        )
    }

    /// Same-length grouped conv over time of a `[B, T, C]` tensor (returns `[B, T, O]`).
    fn conv_time(&self, x: &Tensor, p: &str, groups: usize) -> Result<Tensor> {
        let w = self.get(&format!("{p}.weight"))?;
        let b = self.get(&format!("{p}.bias"))?;
        let k = w.dim(2)?;
        let t = x.dim(1)?;
        let fused =
            super::fused::fused_ok(x) && super::fused::fused_ok(w) && super::fused::fused_ok(b);
        let y = if fused {
            super::fused::conv1d_time_bias_fused(x, w, b, k / 2, 1, groups)?
        } else {
            conv1d_time(x, w, k / 2, 1, groups)?.broadcast_add(b)?
        };
        // Even kernels give one extra frame (fairseq's SamePad drops it).
        if y.dim(1)? > t {
            y.narrow(1, 0, t)
        } else {
            Ok(y)
        }
    }

    /// Front-end (§1.2, §7): batch features `[B, N, F]` → frames `[B, T, D]`.
    pub fn frontend(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.frontend.kind {
            FrontendKind::Fbank => {
                let y = self.ln(x, "frontend.ln")?;
                self.lin(&y, "frontend.proj")
            }
            FrontendKind::Cnn => {
                // Channels last throughout: [B, samples, 1] → [B, T, 512].
                let mut h = x.clone();
                for (i, l) in self.cfg.frontend.conv_layers.iter().enumerate() {
                    let w = self.get(&format!("frontend.conv.{i}.weight"))?;
                    h = conv1d_time(&h, w, 0, l[2], 1)?;
                    // LayerNorm over channels, then GELU.
                    h = gelu(&self.ln(&h, &format!("frontend.conv.{i}.ln"))?)?;
                }
                let y = self.ln(&h, "frontend.ln")?;
                self.lin(&y, "frontend.proj")
            }
        }
    }

    /// Convolutional positional encoder (§2.3): `[B, T, D]` → `[B, T, D]` (to be added).
    pub fn pos_conv(&self, x: &Tensor) -> Result<Tensor> {
        self.pos_conv_masked(x, None)
    }

    /// [`Model::pos_conv`] with the frames where `keep` `[B, T, 1]` is 0 (padding) zeroed before
    /// every layer, so that padding reads as the zero padding at an utterance's end.
    fn pos_conv_masked(&self, x: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        let e = &self.cfg.encoder;
        let mut h = x.clone();
        for l in 0..e.pos_conv_depth {
            if let Some(k) = keep {
                h = h.broadcast_mul(k)?;
            }
            h = self.conv_time(&h, &format!("encoder.pos_conv.{l}"), e.pos_conv_groups)?;
            h = gelu(&layer_norm(&h, None, 1e-5)?)?;
        }
        Ok(h)
    }

    /// ALiBi bias `[B|1, H, Tv, Tv]` for the kept positions of each row, scaled by the learned
    /// per-head scale clamped at ≥ 0 (§2.4), in [`acc_dtype`] of `dtype` (f32 for the 16-bit
    /// types: it joins the scores in the f32 softmax). Off the fused CPU path the distances are
    /// built on `device` from the `B × Tv` kept positions (no `B × Tv × Tv` host tensor).
    pub fn alibi(&self, positions: &[Vec<usize>], dtype: DType, device: &Device) -> Result<Tensor> {
        let dtype = acc_dtype(dtype);
        let h = self.cfg.encoder.heads;
        let rows = positions.len();
        let tv = positions.first().map_or(0, |p| p.len());
        let slopes: Vec<f32> = alibi_slopes(h).into_iter().map(|s| s as f32).collect();
        let scale = self.get("encoder.alibi_scale")?;
        if dtype == DType::F32 && device.is_cpu() && super::fused::fused_ok(scale) {
            // One op from the per-head slopes to the bias (its backward one reduction per head).
            let m = Tensor::from_vec(slopes, h, &Device::Cpu)?.mul(&scale.relu()?.reshape(h)?)?;
            return super::fused::alibi_bias_fused(distances(positions), rows, tv, &m);
        }
        // |p_i − p_j|, exact in f32 below 2²⁴ frames (as the host-built distances were).
        let pos: Vec<f32> = positions.iter().flatten().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (rows, 1, tv, 1), device)?.to_dtype(dtype)?;
        let dist = pos.broadcast_sub(&pos.reshape((rows, 1, 1, tv))?)?.abs()?;
        let slopes = Tensor::from_vec(slopes, (1, h, 1, 1), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let scale = scale.to_dtype(dtype)?.relu()?.reshape((1, h, 1, 1))?;
        let m = slopes.mul(&scale)?;
        dist.broadcast_mul(&m)?.neg()
    }

    /// One post-LN block (§2.5). Returns the block output and its FFN output `f` (the target
    /// layer, before dropout, residual and LN2).
    pub fn block(
        &self,
        l: usize,
        x: &Tensor,
        bias: &Tensor,
        noise: &mut Option<&mut Noise>,
    ) -> Result<(Tensor, Tensor)> {
        let e = &self.cfg.encoder;
        let p = format!("encoder.blocks.{l}");
        let (_, _, d) = x.dims3()?;
        let h = e.heads;
        let dh = d / h;
        let qkv = self.lin(x, &format!("{p}.attn.qkv"))?;
        let scale = 1.0 / (dh as f64).sqrt();
        let o = if super::fused::fused_ok(&qkv) && super::fused::fused_ok(bias) {
            // One op from the projection to the heads' outputs (no q/k/v copies).
            let drop = match noise.as_deref_mut() {
                Some(n) => n.dropout_spec(e.attention_dropout),
                None => None,
            };
            super::fused::attention_fused(&qkv, bias, h, scale, drop)?
        } else {
            self.attention_composed(&qkv, bias, h, scale, noise)?
        };
        let o = self.lin(&o, &format!("{p}.attn.proj"))?;
        let h1 = self.add_ln(x, &o, &format!("{p}.ln1"), e.dropout, noise)?;
        let mut a = gelu(&self.lin(&h1, &format!("{p}.fc1"))?)?;
        if let Some(n) = noise.as_deref_mut() {
            // Draws nothing at 0 (pre-training), so its runs are as before.
            a = n.dropout(&a, e.activation_dropout)?;
        }
        let f = self.lin(&a, &format!("{p}.fc2"))?;
        let out = self.add_ln(&h1, &f, &format!("{p}.ln2"), e.dropout, noise)?;
        Ok((out, f))
    }

    /// The post-LN residual `LN(x + dropout(o))` (dropout only with `noise`): one fused op for f32
    /// on the CPU, the same draws either way.
    fn add_ln(
        &self,
        x: &Tensor,
        o: &Tensor,
        p: &str,
        p_drop: f64,
        noise: &mut Option<&mut Noise>,
    ) -> Result<Tensor> {
        let w = self.get(&format!("{p}.weight"))?;
        let b = self.get(&format!("{p}.bias"))?;
        use super::fused::fused_ok;
        if fused_ok(x) && fused_ok(o) && fused_ok(w) && fused_ok(b) {
            let drop = match noise.as_deref_mut() {
                Some(n) => n.dropout_spec(p_drop),
                None => None,
            };
            return super::fused::add_layer_norm_fused(x, o, drop, w, b, 1e-5);
        }
        let od = match noise.as_deref_mut() {
            Some(n) => n.dropout(o, p_drop)?,
            None => o.clone(),
        };
        layer_norm(&(x + od)?, Some((w, b)), 1e-5)
    }

    /// The attention core with primitive ops (every device and dtype): `qkv` `[B, T, 3D]` →
    /// `softmax(q·kᵀ·scale + bias)` with dropout, times `v`, heads side by side `[B, T, D]`.
    fn attention_composed(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        h: usize,
        scale: f64,
        noise: &mut Option<&mut Noise>,
    ) -> Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let d = d3 / 3;
        let qkv = qkv.reshape((b, t, 3, h, d / h))?.permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mut att = softmax_with_bias(&matmul(&q, &k.t()?)?, scale, bias)?;
        if let Some(n) = noise.as_deref_mut() {
            att = n.dropout(&att, self.cfg.encoder.attention_dropout)?;
        }
        matmul(&att, &v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, d))
    }

    /// Teacher forward (§1.3–1.4) on front-end frames `z` `[B, T, D]` (detached by the caller):
    /// targets = mean of the instance-normalised FFN outputs of the top-K blocks; predicted
    /// loss = mean over channels of the loss predictor applied to the targets.
    pub fn teacher(&self, z: &Tensor) -> Result<TeacherOut> {
        let e = &self.cfg.encoder;
        let (b, t, _) = z.dims3()?;
        let x = (z + self.pos_conv(z)?)?;
        let mut x = self.ln(&x, "encoder.ln_in")?;
        let positions: Vec<Vec<usize>> = vec![(0..t).collect()];
        let bias = self.alibi(&positions, z.dtype(), z.device())?;
        let mut acc: Option<Tensor> = None;
        let mut none = None;
        for l in 0..e.layers {
            let (out, f) = self.block(l, &x, &bias, &mut none)?;
            if l + e.top_k >= e.layers {
                let layer = if self.cfg.end_of_block_targets {
                    &out
                } else {
                    &f
                };
                let n = instance_norm_time(&layer.to_dtype(DType::F32)?)?;
                acc = Some(match acc {
                    Some(a) => (a + n)?,
                    None => n,
                });
            }
            x = out;
        }
        let targets = match acc {
            Some(a) => (a / e.top_k as f64)?,
            None => candle_core::bail!("top_k is 0"),
        };
        let pred_in = match self.cfg.teacher_pred_input {
            TeacherPredInput::Targets => targets.to_dtype(z.dtype())?,
            TeacherPredInput::LastLayer => x,
        };
        let pred = self.head("loss_predictor", &pred_in, &self.cfg.loss_predictor, true)?;
        let pred_loss = pred
            .to_dtype(acc_dtype(pred.dtype()))?
            .mean(D::Minus1)?
            .to_dtype(DType::F32)?;
        let _ = b;
        Ok(TeacherOut { targets, pred_loss })
    }

    /// Student encoder (§1.5) on frames `z` `[B, T, D]` (with gradient) and the mask (`true` =
    /// hidden; every row hides the same number of frames). Returns `h` `[B, T − M, D]` and the
    /// visible positions of each row.
    pub fn student_encoder(
        &self,
        z: &Tensor,
        mask: &[bool],
        noise: &mut Option<&mut Noise>,
    ) -> Result<(Tensor, Vec<Vec<usize>>)> {
        let e = &self.cfg.encoder;
        let (b, t, d) = z.dims3()?;
        let keep: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (b, t, 1), &Device::Cpu)?
            .to_dtype(z.dtype())?
            .to_device(z.device())?;
        let x0 = z.broadcast_mul(&keep)?;
        let pos = self.pos_conv(&x0)?;
        let positions: Vec<Vec<usize>> = (0..b)
            .map(|r| (0..t).filter(|&i| !mask[r * t + i]).collect())
            .collect();
        let tv = positions.first().map_or(0, |p| p.len());
        if positions.iter().any(|p| p.len() != tv) {
            candle_core::bail!("every row must hide the same number of frames");
        }
        let idx: Vec<u32> = positions
            .iter()
            .enumerate()
            .flat_map(|(r, p)| p.iter().map(move |&i| (r * t + i) as u32))
            .collect();
        let idx = Tensor::from_vec(idx, b * tv, z.device())?;
        let v = (z + pos)?
            .reshape((b * t, d))?
            .index_select(&idx, 0)?
            .reshape((b, tv, d))?;
        let mut x = self.ln(&v, "encoder.ln_in")?;
        if let Some(n) = noise.as_deref_mut() {
            x = n.dropout(&x, e.dropout)?;
        }
        let bias = self.alibi(&positions, z.dtype(), z.device())?;
        for l in 0..e.layers {
            if let Some(n) = noise.as_deref_mut() {
                if n.coin(e.layerdrop) {
                    continue;
                }
            }
            x = self.block(l, &x, &bias, noise)?.0;
        }
        Ok((x, positions))
    }

    /// Encoder for downstream use: every frame visible, no dropout. Returns the output of each
    /// block (`[B, T, D]` each).
    pub fn encode(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        let mut all = self.hidden_states(z)?;
        all.remove(0);
        Ok(all)
    }

    /// [`Model::encode`] with the blocks' input first (after the positional convolution and
    /// `encoder.ln_in`): `layers + 1` tensors, as the exported PyTorch module's `hidden_states`.
    pub fn hidden_states(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        self.hidden_states_padded(z, None)
    }

    /// [`Model::hidden_states`] of a padded batch: row `r` has `lengths[r]` real frames (the
    /// rest padding). Padded frames are zeroed before every positional convolution, are no
    /// attention key, and come back as zeros, so each row gives what it gives alone.
    pub fn hidden_states_padded(
        &self,
        z: &Tensor,
        lengths: Option<&[usize]>,
    ) -> Result<Vec<Tensor>> {
        self.hidden_states_train(z, lengths, &mut None)
    }

    /// [`Model::hidden_states_padded`] in training mode when `noise` is given: dropout after
    /// `encoder.ln_in` and in the blocks, and layerdrop (a skipped block repeats its input in the
    /// returned states). Fine-tuning's forward pass.
    pub fn hidden_states_train(
        &self,
        z: &Tensor,
        lengths: Option<&[usize]>,
        noise: &mut Option<&mut Noise>,
    ) -> Result<Vec<Tensor>> {
        let (b, t, _) = z.dims3()?;
        let keep = match lengths {
            Some(l) => {
                if l.len() != b || l.iter().any(|&n| n > t) {
                    candle_core::bail!("hidden_states: lengths {l:?} for {b} rows of {t} frames");
                }
                let m: Vec<f32> = l
                    .iter()
                    .flat_map(|&n| (0..t).map(move |i| if i < n { 1.0 } else { 0.0 }))
                    .collect();
                Some(Tensor::from_vec(m, (b, t, 1), z.device())?.to_dtype(z.dtype())?)
            }
            None => None,
        };
        let pos = self.pos_conv_masked(z, keep.as_ref())?;
        let x = (z + pos)?;
        let mut x = self.ln(&x, "encoder.ln_in")?;
        if let Some(n) = noise.as_deref_mut() {
            x = n.dropout(&x, self.cfg.encoder.dropout)?;
        }
        let mut bias = self.alibi(&[(0..t).collect()], z.dtype(), z.device())?;
        if let Some(l) = lengths {
            // Padded keys: a large negative bias (their weight underflows to 0, or 1e-38 of the
            // row in the fused kernel's clamped exponential).
            let m: Vec<f32> = l
                .iter()
                .flat_map(|&n| (0..t).map(move |j| if j < n { 0.0 } else { -1e30 }))
                .collect();
            let m = Tensor::from_vec(m, (b, 1, 1, t), z.device())?.to_dtype(bias.dtype())?;
            bias = bias.broadcast_add(&m)?;
        }
        let masked = |h: Tensor| -> Result<Tensor> {
            match &keep {
                Some(k) => h.broadcast_mul(k),
                None => Ok(h),
            }
        };
        let mut outs = vec![masked(x.clone())?];
        for l in 0..self.cfg.encoder.layers {
            let skip = match noise.as_deref_mut() {
                Some(n) => n.coin(self.cfg.encoder.layerdrop),
                None => false,
            };
            if !skip {
                x = self.block(l, &x, &bias, noise)?.0;
            }
            outs.push(masked(x.clone())?);
        }
        Ok(outs)
    }

    /// Decoder (§2.6) or loss predictor (§2.7) over `[B, T, D]` → `[B, T, D]`.
    ///
    /// Each block adds its input back whenever it keeps the width, block 0 included
    /// (`fairseq: examples/data2vec/models/modalities/modules.py` `DecoderBase.add_residual`:
    /// skipped only when `residual.size(1) != x.size(1)`; EH-MAM's `PredDecoder1d` uses the same
    /// rule). The presets change width at block 0 (D → head dim), so only later blocks add it.
    pub fn head(&self, p: &str, u: &Tensor, h: &HeadConfig, predictor: bool) -> Result<Tensor> {
        let mut x = u.clone();
        for l in 0..h.layers {
            let y = self.conv_time(&x, &format!("{p}.blocks.{l}.conv"), h.groups)?;
            let y = gelu(&layer_norm(&y, None, 1e-5)?)?;
            x = if x.dim(D::Minus1)? == y.dim(D::Minus1)? {
                (x + y)?
            } else {
                y
            };
        }
        if predictor {
            x = self.ln(&x, &format!("{p}.ln"))?;
        }
        self.lin(&x, &format!("{p}.proj"))
    }

    /// `fill` of §1.6: dropout on `h` `[B, Tv, D]`, scattered back to its positions among `T`
    /// frames, fresh noise tokens N(0, σ²) at the hidden ones.
    pub fn fill(
        &self,
        h: &Tensor,
        positions: &[Vec<usize>],
        t: usize,
        dropped: Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let (b, tv, d) = h.dims3()?;
        let m = t - tv;
        let tokens = noise.normal(&[b * m, d], self.cfg.mask_noise_std, h.dtype(), h.device())?;
        let _ = h;
        let all = Tensor::cat(&[&dropped.reshape((b * tv, d))?, &tokens], 0)?;
        // Row r, frame i: visible → its index among the kept rows; hidden → a noise token.
        let mut idx = Vec::with_capacity(b * t);
        for (r, p) in positions.iter().enumerate() {
            let mut k = 0usize;
            let mut hidden = 0usize;
            for i in 0..t {
                if k < p.len() && p[k] == i {
                    idx.push((r * tv + k) as u32);
                    k += 1;
                } else {
                    idx.push((b * tv + r * m + hidden) as u32);
                    hidden += 1;
                }
            }
        }
        let idx = Tensor::from_vec(idx, b * t, h.device())?;
        all.index_select(&idx, 0)?.reshape((b, t, d))
    }
}
