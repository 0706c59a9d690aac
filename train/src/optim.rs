//! The optimizers a parameter server applies to its part of the parameters: plain `f32` slices
//! and per-element state, so a server holds any contiguous range of the flattened parameters
//! (see [`crate::partition`]) without knowing which tensors it cuts across.
//!
//! - SGD with momentum (the PyTorch convention): `g += wd * p; v = momentum * v + g;
//!   p -= lr * v`.
//! - AdamW (decoupled weight decay, bias-corrected moments), step for step the same arithmetic
//!   as `candle_nn::AdamW` (checked in the tests).

/// An optimizer and its settings (`optimizer = { kind = "sgd" | "adamw", ... }`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Optimizer {
    /// Stochastic gradient descent with momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0: plain SGD).
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// Adam with decoupled weight decay.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the root of the second moment.
        eps: f64,
        /// Decoupled weight decay (the parameter shrinks by `lr * weight_decay` each step).
        weight_decay: f64,
    },
}

impl Optimizer {
    /// AdamW with candle-nn's defaults (betas 0.9, 0.999, eps 1e-8, weight decay 0.01).
    pub fn adamw(lr: f64) -> Self {
        Self::AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd { lr, .. } | Self::AdamW { lr, .. } => *lr,
        }
    }

    /// The same optimizer at another learning rate (schedules).
    pub fn with_lr(self, lr: f64) -> Self {
        match self {
            Self::Sgd { momentum, weight_decay, .. } => Self::Sgd { lr, momentum, weight_decay },
            Self::AdamW { beta1, beta2, eps, weight_decay, .. } => Self::AdamW { lr, beta1, beta2, eps, weight_decay },
        }
    }

    /// Refuses settings that cannot train: a learning rate that is not positive and finite,
    /// momentum or betas outside [0, 1), a negative weight decay or eps.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) { Ok(()) } else { Err(format!("`{name}` must be in [0, 1), got {v}")) }
        };
        let non_negative = |name: &str, v: f64| {
            if v >= 0.0 && v.is_finite() { Ok(()) } else { Err(format!("`{name}` must be >= 0, got {v}")) }
        };
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(format!("`lr` must be a positive number, got {lr}"));
        }
        match *self {
            Self::Sgd { momentum, weight_decay, .. } => {
                unit("momentum", momentum)?;
                non_negative("weight_decay", weight_decay)
            }
            Self::AdamW { beta1, beta2, eps, weight_decay, .. } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                non_negative("eps", eps)?;
                non_negative("weight_decay", weight_decay)
            }
        }
    }
}

/// An optimizer's state for one slice of parameters.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    optimizer: Optimizer,
    /// SGD: the velocity; AdamW: the first moment.
    first: Vec<f32>,
    /// AdamW: the second moment (empty for SGD).
    second: Vec<f32>,
    steps: u64,
}

impl OptimizerState {
    /// Fresh state for `len` parameters.
    pub fn new(optimizer: Optimizer, len: usize) -> Self {
        let second = if matches!(optimizer, Optimizer::AdamW { .. }) { vec![0.0; len] } else { Vec::new() };
        Self { optimizer, first: vec![0.0; len], second, steps: 0 }
    }

    /// Steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Changes the learning rate from the next step on (the state is kept).
    pub fn set_lr(&mut self, lr: f64) {
        self.optimizer = self.optimizer.with_lr(lr);
    }

    /// One step: `params -= update(grad)`.
    ///
    /// # Panics
    /// If `params` or `grad` is not the length the state was made for.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        assert_eq!(params.len(), self.first.len(), "parameter slice of another length");
        assert_eq!(grad.len(), self.first.len(), "gradient of another length");
        self.steps += 1;
        match self.optimizer {
            Optimizer::Sgd { lr, momentum, weight_decay } => {
                let (lr, mu, wd) = (lr as f32, momentum as f32, weight_decay as f32);
                for ((p, g), v) in params.iter_mut().zip(grad).zip(&mut self.first) {
                    let g = g + wd * *p;
                    *v = mu * *v + g;
                    *p -= lr * *v;
                }
            }
            Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                let t = self.steps as i32;
                let scale_m = (1.0 / (1.0 - beta1.powi(t))) as f32;
                let scale_v = (1.0 / (1.0 - beta2.powi(t))) as f32;
                let (b1, b2, lr, eps) = (beta1 as f32, beta2 as f32, lr as f32, eps as f32);
                let decay = 1.0 - (lr as f64 * weight_decay) as f32;
                for (((p, g), m), v) in params.iter_mut().zip(grad).zip(&mut self.first).zip(&mut self.second) {
                    *m = *m * b1 + g * (1.0 - b1);
                    *v = *v * b2 + g * g * (1.0 - b2);
                    let m_hat = *m * scale_m;
                    let v_hat = *v * scale_v;
                    *p = *p * decay - m_hat / (v_hat.sqrt() + eps) * lr;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use candle_nn::Optimizer as _;

    fn grad(step: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + step * 3) as f32 * 0.31).sin()).collect()
    }

    #[test]
    fn adamw_matches_candle_nn_step_for_step() {
        let n = 37;
        let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.17).cos()).collect();
        let var = Var::from_slice(&init, n, &Device::Cpu).unwrap();
        let params = candle_nn::ParamsAdamW { lr: 0.01, weight_decay: 0.05, ..Default::default() };
        let mut theirs = candle_nn::AdamW::new(vec![var.clone()], params).unwrap();
        let mut ours = OptimizerState::new(
            Optimizer::AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 },
            n,
        );
        let mut p = init.clone();
        for step in 0..20 {
            let g = grad(step, n);
            // candle computes the gradient of sum(var * g), which is g.
            let gt = Tensor::from_slice(&g, n, &Device::Cpu).unwrap();
            let loss = (var.as_tensor() * &gt).unwrap().sum_all().unwrap();
            theirs.backward_step(&loss).unwrap();
            ours.step(&mut p, &g);
            let want: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            let worst = p.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-6, "step {step}: max diff {worst}");
        }
        assert_eq!(ours.steps(), 20);
    }

    #[test]
    fn sgd_momentum_follows_its_definition() {
        let mut s = OptimizerState::new(Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }, 1);
        let mut p = [1.0f32];
        s.step(&mut p, &[1.0]); // v = 1, p = 0.9
        s.step(&mut p, &[1.0]); // v = 1.9, p = 0.71
        assert!((p[0] - 0.71).abs() < 1e-6, "{}", p[0]);
        let mut plain = OptimizerState::new(Optimizer::Sgd { lr: 0.5, momentum: 0.0, weight_decay: 0.1 }, 1);
        let mut q = [2.0f32];
        plain.step(&mut q, &[1.0]); // g = 1 + 0.2, q = 2 - 0.6
        assert!((q[0] - 1.4).abs() < 1e-6, "{}", q[0]);
    }

    #[test]
    fn both_minimise_a_quadratic() {
        for opt in [Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 }, Optimizer::adamw(0.05)] {
            let target: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
            let mut p = vec![0f32; 10];
            let mut s = OptimizerState::new(opt, 10);
            for _ in 0..500 {
                let g: Vec<f32> = p.iter().zip(&target).map(|(p, t)| 2.0 * (p - t)).collect();
                s.step(&mut p, &g);
            }
            let err = p.iter().zip(&target).map(|(p, t)| (p - t).abs()).fold(0f32, f32::max);
            // AdamW's decay pulls slightly towards zero.
            assert!(err < 0.15, "{opt:?}: max error {err}");
        }
    }

    #[test]
    fn settings_that_cannot_train_are_named() {
        assert!(Optimizer::adamw(0.0).validate().unwrap_err().contains("`lr`"));
        assert!(Optimizer::adamw(f64::NAN).validate().unwrap_err().contains("`lr`"));
        let m = Optimizer::Sgd { lr: 0.1, momentum: 1.0, weight_decay: 0.0 }.validate().unwrap_err();
        assert!(m.contains("`momentum` must be in [0, 1)"), "{m}");
        let d = Optimizer::Sgd { lr: 0.1, momentum: 0.5, weight_decay: -1.0 }.validate().unwrap_err();
        assert!(d.contains("`weight_decay`"), "{d}");
        assert!(Optimizer::adamw(1e-3).validate().is_ok());
        assert_eq!(Optimizer::adamw(1e-3).with_lr(0.5).lr(), 0.5);
    }
}
