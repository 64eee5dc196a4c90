//! Audio: decoding with symphonia (every container and codec it offers), down-mixing to mono and
//! resampling with rubato's FFT resampler.

use rubato::{FftFixedInOut, Resampler};
use std::fs::File;
use std::path::Path;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Decoded audio at its native rate: interleaved `f32` in [-1, 1].
#[derive(Debug, Clone)]
pub struct PcmAudio {
    pub sample_rate: u32,
    pub channels: usize,
    pub interleaved: Vec<f32>,
    /// The codec's name (e.g. `pcm_s16le`, `flac`, `mp3`).
    pub codec: String,
}

impl PcmAudio {
    pub fn frames(&self) -> usize {
        self.interleaved.len().checked_div(self.channels).unwrap_or(0)
    }

    /// Mono by averaging the channels.
    pub fn to_mono(&self) -> Vec<f32> {
        let c = self.channels.max(1);
        if c == 1 {
            return self.interleaved.clone();
        }
        let scale = 1.0 / c as f32;
        self.interleaved.chunks_exact(c).map(|f| f.iter().sum::<f32>() * scale).collect()
    }
}

/// Why a file was rejected: a short category and the details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn reject(msg: impl Into<String>) -> Rejection {
    Rejection(msg.into())
}

fn is_lossless(codec: &str) -> bool {
    codec.starts_with("pcm") || codec == "flac" || codec == "alac" || codec.contains("adpcm")
}

/// Decodes a whole file. Every failure is a [`Rejection`] with its reason; nothing panics.
pub fn decode_file(path: &Path) -> Result<PcmAudio, Rejection> {
    let meta = std::fs::metadata(path).map_err(|e| reject(format!("unreadable: {e}")))?;
    if !meta.is_file() {
        return Err(reject("not a regular file"));
    }
    if meta.len() == 0 {
        return Err(reject("empty: the file has 0 bytes"));
    }
    let file = File::open(path).map_err(|e| reject(format!("unreadable: {e}")))?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(&ext.to_ascii_lowercase());
    }
    let fmt_opts = FormatOptions { enable_gapless: true, ..Default::default() };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &fmt_opts, &MetadataOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(m) => reject(format!("not audio, or a format symphonia does not read ({m})")),
            SymError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => reject("truncated: the file ends inside its header"),
            SymError::IoError(io) => reject(format!("unreadable: {io}")),
            SymError::DecodeError(m) => reject(format!("invalid header: {m}")),
            other => reject(format!("invalid header: {other}")),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| reject("not audio: no audio track"))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let sample_rate = match params.sample_rate {
        Some(r) if r > 0 => r,
        _ => return Err(reject("invalid header: the sample rate is missing or 0")),
    };
    if let Some(ch) = params.channels {
        if ch.count() == 0 {
            return Err(reject("invalid header: 0 channels"));
        }
    }
    let codec = symphonia::default::get_codecs()
        .get_codec(params.codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| "unknown".into());
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| reject(format!("unsupported codec `{codec}`: {e}")))?;

    let mut out: Vec<f32> = Vec::new();
    let mut channels: Option<usize> = None;
    let mut sbuf: Option<SampleBuffer<f32>> = None;
    let mut packets = 0usize;
    let mut bad_packets = 0usize;
    let mut first_error = String::new();
    let mut cut = false;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => return Err(reject("unsupported: the stream changes its parameters mid-file")),
            Err(SymError::IoError(e)) => return Err(reject(format!("unreadable: {e}"))),
            Err(e) => {
                // A container that breaks off mid-structure.
                cut = true;
                first_error = e.to_string();
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        packets += 1;
        match decoder.decode(&packet) {
            Ok(buf) => {
                let spec = *buf.spec();
                let n = spec.channels.count();
                if n == 0 {
                    return Err(reject("invalid header: 0 channels"));
                }
                match channels {
                    None => channels = Some(n),
                    Some(c) if c != n => return Err(reject(format!("unsupported: the channel count changes mid-file ({c} → {n})"))),
                    _ => {}
                }
                if buf.frames() == 0 {
                    continue;
                }
                let need = buf.capacity() as u64;
                if sbuf.as_ref().is_none_or(|b| b.capacity() < buf.capacity() * n) {
                    sbuf = Some(SampleBuffer::new(need, spec));
                }
                if let Some(sb) = sbuf.as_mut() {
                    sb.copy_interleaved_ref(buf);
                    out.extend_from_slice(sb.samples());
                }
            }
            Err(SymError::DecodeError(m)) => {
                bad_packets += 1;
                if first_error.is_empty() {
                    first_error = m.to_string();
                }
            }
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                cut = true;
                break;
            }
            Err(e) => return Err(reject(format!("decode error: {e}"))),
        }
    }
    let channels = channels.or(params.channels.map(|c| c.count())).unwrap_or(1);
    let frames = out.len() / channels;
    if frames == 0 {
        if bad_packets > 0 {
            return Err(reject(format!("corrupt: none of {packets} packets decoded ({first_error})")));
        }
        return Err(reject("empty: no audio samples"));
    }
    if bad_packets > 0 {
        return Err(reject(format!("corrupt: {bad_packets} of {packets} packets failed to decode ({first_error})")));
    }
    if let Some(expected) = params.n_frames {
        // Lossy decoders may differ from the header by a frame's worth of priming or padding.
        let slack = if is_lossless(&codec) { 0 } else { 4096 };
        if (frames as u64) + slack < expected {
            return Err(reject(format!("truncated: the header promises {expected} samples per channel, the file holds {frames}")));
        }
    }
    if cut {
        return Err(reject(format!("truncated: the stream breaks off after {frames} samples per channel{}", if first_error.is_empty() { String::new() } else { format!(" ({first_error})") })));
    }
    if let Some(bad) = out.iter().position(|x| !x.is_finite()) {
        return Err(reject(format!("non-finite samples (first at sample {})", bad / channels)));
    }
    Ok(PcmAudio { sample_rate, channels, interleaved: out, codec })
}

/// Resamples mono audio from `from` Hz to `to` Hz with rubato's synchronous FFT resampler.
/// The output has `round(len · to / from)` samples and no added delay.
pub fn resample(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    if from == to || input.is_empty() {
        return Ok(input.to_vec());
    }
    let expected = ((input.len() as u128 * to as u128 + from as u128 / 2) / from as u128) as usize;
    let mut rs = FftFixedInOut::<f32>::new(from as usize, to as usize, 1024, 1).map_err(|e| format!("resampler {from} → {to} Hz: {e}"))?;
    let delay = rs.output_delay();
    let mut out: Vec<f32> = Vec::with_capacity(expected + delay + 4096);
    let mut obuf = rs.output_buffer_allocate(true);
    let mut pos = 0usize;
    loop {
        let need = rs.input_frames_next();
        if pos + need > input.len() {
            break;
        }
        let (used, n) = rs.process_into_buffer(&[&input[pos..pos + need]], &mut obuf, None).map_err(|e| format!("resampling: {e}"))?;
        out.extend_from_slice(&obuf[0][..n]);
        pos += used;
    }
    if pos < input.len() {
        let (_, n) = rs.process_partial_into_buffer(Some(&[&input[pos..]]), &mut obuf, None).map_err(|e| format!("resampling: {e}"))?;
        out.extend_from_slice(&obuf[0][..n]);
    }
    while out.len() < delay + expected {
        let (_, n) = rs.process_partial_into_buffer(None::<&[&[f32]]>, &mut obuf, None).map_err(|e| format!("resampling: {e}"))?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&obuf[0][..n]);
    }
    out.drain(..delay.min(out.len()));
    out.truncate(expected);
    Ok(out)
}

/// Converts samples in [-1, 1] to 16-bit PCM (rounded, clipped), as WAV writers do.
pub fn to_i16(x: f32) -> i16 {
    (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resample_keeps_length_and_a_tone() {
        // A 440 Hz tone at 48 kHz → 16 kHz: the same tone, length scaled exactly.
        let x: Vec<f32> = (0..48000).map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48000.0).sin() * 0.5).collect();
        let y = resample(&x, 48000, 16000).unwrap();
        assert_eq!(y.len(), 16000);
        let want: Vec<f32> = (0..16000).map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16000.0).sin() * 0.5).collect();
        // Away from the edges the resampled tone matches the analytic one closely.
        let err = y[500..15500].iter().zip(&want[500..15500]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 2e-3, "max error {err}");
        assert_eq!(resample(&x[..1000], 44100, 16000).unwrap().len(), 363);
    }

    #[test]
    fn int16_conversion_rounds_and_clips() {
        assert_eq!(to_i16(0.0), 0);
        assert_eq!(to_i16(1.0), 32767);
        assert_eq!(to_i16(-1.0), -32768);
        assert_eq!(to_i16(-2.0), -32768);
        assert_eq!(to_i16(100.4 / 32768.0), 100);
        assert_eq!(to_i16(100.6 / 32768.0), 101);
    }
}
