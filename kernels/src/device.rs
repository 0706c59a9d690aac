//! Devices: the graph's `device = "cpu" | "cuda:N"` as a candle [`Device`].

use candle_core::Device;
use maas_graphs::DeviceSpec;

use crate::error::{KernelError, Result};

/// The device for a submodel. Each CUDA device gets its own stream, so that every actor that
/// opens one orders its own work (`Device::new_cuda_with_stream`).
pub fn open_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(KernelError::Device {
                    device: spec.to_string(),
                    message: "this build of maas has no CUDA support (build with `--features cuda`)".into(),
                });
            }
            Device::new_cuda_with_stream(n)
                .map_err(|e| KernelError::Device { device: spec.to_string(), message: e.to_string() })
        }
    }
}
