//! Audio: decoding with symphonia (every container and codec it offers), down-mixing to mono and
//! resampling with rubato's FFT resampler.

use rubato::Resampler;
use std::fs::File;
use std::path::Path;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Highest sample rate a header may declare (768 kHz); above it the file is rejected.
pub const MAX_SAMPLE_RATE: u32 = 768_000;

/// Lowest sample rate a header may declare (1 kHz); below it the file is rejected as
/// `invalid header`: no speech recording is made at such a rate, and resampling it up would
/// only make noise of a lying header.
pub const MIN_SAMPLE_RATE: u32 = 1_000;

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
        self.interleaved
            .len()
            .checked_div(self.channels)
            .unwrap_or(0)
    }

    /// Mono by averaging the channels.
    pub fn to_mono(&self) -> Vec<f32> {
        let c = self.channels.max(1);
        if c == 1 {
            return self.interleaved.clone();
        }
        let scale = 1.0 / c as f32;
        self.interleaved
            .chunks_exact(c)
            .map(|f| f.iter().sum::<f32>() * scale)
            .collect()
    }
}

/// Why a file was rejected: a short category and the details (the `reason` of
/// [`crate::Error::BadInput`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection(pub String);

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

thread_local! {
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics inside a decoder (symphonia 0.5 panics on some impossible headers, e.g. a WAV with a
/// 0 Hz sample rate) are caught and become rejections; this hook keeps them off stderr.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(|f| f.get()) {
                default(info);
            }
        }));
    });
}

/// Decodes a whole file. Every failure is [`crate::Error::BadInput`] with its reason (a short
/// category, then the details); nothing panics.
pub fn decode_file(path: &Path) -> crate::Result<PcmAudio> {
    decode_catching(path).map_err(|r| crate::Error::BadInput {
        path: path.into(),
        reason: r.0,
    })
}

fn decode_catching(path: &Path) -> Result<PcmAudio, Rejection> {
    catching(|| decode_file_inner(path))
}

/// Runs `f` (decoder calls) with a decoder panic turned into an `invalid header` rejection.
fn catching<T>(f: impl FnOnce() -> Result<T, Rejection>) -> Result<T, Rejection> {
    install_quiet_hook();
    IN_DECODER.with(|f| f.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_DECODER.with(|f| f.set(false));
    match result {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(reject(format!(
                "invalid header: the decoder gave up ({msg})"
            )))
        }
    }
}

fn decode_file_inner(path: &Path) -> Result<PcmAudio, Rejection> {
    let (mut format, track_id, params, sample_rate, codec) = open_track(path)?;
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| reject(format!("unsupported codec `{codec}`: {e}")))?;
    let d = decode_packets(format.as_mut(), decoder.as_mut(), track_id)?;
    finish_decoding(path, d, &params, sample_rate, codec)
}

/// What the packet loop gathered: interleaved samples, the channel count and what went wrong.
struct Packets {
    out: Vec<f32>,
    channels: Option<usize>,
    packets: usize,
    bad_packets: usize,
    first_error: String,
    /// The container broke off mid-structure.
    cut: bool,
}

type Track = (
    Box<dyn symphonia::core::formats::FormatReader>,
    u32,
    symphonia::core::codecs::CodecParameters,
    u32,
    String,
);

/// Opens and probes a file; its first audio track, with a sane sample rate and channel count.
fn open_track(path: &Path) -> Result<Track, Rejection> {
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
    let fmt_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &fmt_opts, &MetadataOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(m) => reject(format!(
                "not audio, or a format symphonia does not read ({m})"
            )),
            SymError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                reject("truncated: the file ends inside its header")
            }
            SymError::IoError(io) => reject(format!("unreadable: {io}")),
            SymError::DecodeError(m) => reject(format!("invalid header: {m}")),
            other => reject(format!("invalid header: {other}")),
        })?;
    let format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| reject("not audio: no audio track"))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let sample_rate = match params.sample_rate {
        // Real audio tops out at 768 kHz (DXD and the fastest ADCs); a larger rate is a lying
        // header, and resampling from it would build absurdly large FFT plans.
        Some(r) if r > MAX_SAMPLE_RATE => {
            return Err(reject(format!(
                "invalid header: sample rate {r} Hz (more than {MAX_SAMPLE_RATE} Hz)"
            )))
        }
        Some(r) if r >= MIN_SAMPLE_RATE => r,
        Some(r) if r > 0 => {
            return Err(reject(format!(
                "invalid header: sample rate {r} Hz (less than {MIN_SAMPLE_RATE} Hz)"
            )))
        }
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

    Ok((format, track_id, params, sample_rate, codec))
}

/// A file decoded packet by packet into mono `f32` at its native rate: what it holds is one
/// packet, never the whole file. The checks are those of [`decode_file`] (and give the same
/// reasons): errors that stop decoding are returned by [`MonoStream::next_chunk`] at once; those
/// that need the whole file (truncation against the header, corrupt packets, non-finite samples)
/// by [`MonoStream::finish`]. Once such a problem is seen no more samples are handed out. An MP4
/// edit list is applied on the fly.
pub struct MonoStream {
    format: Box<dyn symphonia::core::formats::FormatReader>,
    decoder: Box<dyn symphonia::core::codecs::Decoder>,
    track_id: u32,
    params: symphonia::core::codecs::CodecParameters,
    /// The file's sample rate.
    pub sample_rate: u32,
    /// The codec's name (e.g. `pcm_s16le`, `flac`, `mp3`).
    pub codec: String,
    channels: Option<usize>,
    sbuf: Option<SampleBuffer<f32>>,
    packets: usize,
    bad_packets: usize,
    first_error: String,
    cut: bool,
    done: bool,
    /// Frames decoded, before the edit list.
    decoded: u64,
    first_nonfinite: Option<u64>,
    /// MP4 edit list: leading frames to skip, frames to keep after them.
    edit: (u64, Option<u64>),
    /// Frames handed out (after the edit list).
    emitted: u64,
    chunk: Vec<f32>,
}

impl MonoStream {
    /// Opens and probes `path`. Every failure is a rejection with its reason.
    pub fn open(path: &Path) -> crate::Result<MonoStream> {
        let bad = |r: Rejection| crate::Error::BadInput {
            path: path.into(),
            reason: r.0,
        };
        catching(|| {
            let (format, track_id, params, sample_rate, codec) = open_track(path)?;
            let decoder = symphonia::default::get_codecs()
                .make(&params, &DecoderOptions::default())
                .map_err(|e| reject(format!("unsupported codec `{codec}`: {e}")))?;
            let edit = if codec == "aac" || codec == "alac" {
                mp4_edit(path, sample_rate).unwrap_or((0, None))
            } else {
                (0, None)
            };
            Ok(MonoStream {
                format,
                decoder,
                track_id,
                params,
                sample_rate,
                codec,
                channels: None,
                sbuf: None,
                packets: 0,
                bad_packets: 0,
                first_error: String::new(),
                cut: false,
                done: false,
                decoded: 0,
                first_nonfinite: None,
                edit,
                emitted: 0,
                chunk: Vec::new(),
            })
        })
        .map_err(bad)
    }

    /// Frames per channel the header promises, if it says.
    pub fn header_frames(&self) -> Option<u64> {
        self.params.n_frames
    }

    /// Whether the codec is lossless (its frame count is exact).
    pub fn is_lossless(&self) -> bool {
        is_lossless(&self.codec)
    }

    /// Frames handed out so far (after the MP4 edit list).
    pub fn frames(&self) -> u64 {
        self.emitted
    }

    /// Decodes packets until some mono samples are ready: `Ok(true)` with them in
    /// [`MonoStream::chunk`], `Ok(false)` at the end of the stream.
    pub fn next_chunk(&mut self) -> Result<bool, String> {
        catching(|| self.next_inner()).map_err(|r| r.0)
    }

    /// The samples of the last [`MonoStream::next_chunk`].
    pub fn chunk(&self) -> &[f32] {
        &self.chunk
    }

    /// The checks that need the whole file, once [`MonoStream::next_chunk`] said the end.
    pub fn finish(&self) -> Result<(), String> {
        let frames = self.decoded;
        let (packets, bad_packets, first_error) =
            (self.packets, self.bad_packets, &self.first_error);
        if let Some(expected) = self.params.n_frames {
            // Lossy decoders may differ from the header by a frame's worth of priming or padding;
            // symphonia 0.5's AIFF reader counts the SSND offset fields as 2 extra frames.
            let slack = if is_lossless(&self.codec) { 8 } else { 4096 };
            if frames + slack < expected {
                return Err(format!("truncated: the header promises {expected} samples per channel, the file holds {frames}"));
            }
        }
        if frames == 0 {
            if bad_packets > 0 {
                return Err(format!(
                    "corrupt: none of {packets} packets decoded ({first_error})"
                ));
            }
            if self.cut {
                return Err(format!(
                    "truncated: the stream breaks off before its first samples ({first_error})"
                ));
            }
            return Err("empty: no audio samples".into());
        }
        if bad_packets > 0 {
            return Err(format!(
                "corrupt: {bad_packets} of {packets} packets failed to decode ({first_error})"
            ));
        }
        if self.cut {
            return Err(format!(
                "truncated: the stream breaks off after {frames} samples per channel{}",
                if first_error.is_empty() {
                    String::new()
                } else {
                    format!(" ({first_error})")
                }
            ));
        }
        if let Some(bad) = self.first_nonfinite {
            return Err(format!("non-finite samples (first at sample {bad})"));
        }
        Ok(())
    }

    fn next_inner(&mut self) -> Result<bool, Rejection> {
        self.chunk.clear();
        while !self.done {
            let packet = match self.format.next_packet() {
                Ok(p) => p,
                Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.done = true;
                    break;
                }
                Err(SymError::ResetRequired) => {
                    return Err(reject(
                        "unsupported: the stream changes its parameters mid-file",
                    ))
                }
                Err(SymError::IoError(e)) => return Err(reject(format!("unreadable: {e}"))),
                Err(e) => {
                    // A container that breaks off mid-structure.
                    self.cut = true;
                    self.first_error = e.to_string();
                    self.done = true;
                    break;
                }
            };
            if packet.track_id() != self.track_id {
                continue;
            }
            self.packets += 1;
            match self.decoder.decode(&packet) {
                Ok(buf) => {
                    let spec = *buf.spec();
                    let n = spec.channels.count();
                    if n == 0 {
                        return Err(reject("invalid header: 0 channels"));
                    }
                    match self.channels {
                        None => self.channels = Some(n),
                        Some(c) if c != n => {
                            return Err(reject(format!(
                                "unsupported: the channel count changes mid-file ({c} → {n})"
                            )))
                        }
                        _ => {}
                    }
                    if buf.frames() == 0 {
                        continue;
                    }
                    let need = buf.capacity() as u64;
                    if self
                        .sbuf
                        .as_ref()
                        .is_none_or(|b| b.capacity() < buf.capacity() * n)
                    {
                        self.sbuf = Some(SampleBuffer::new(need, spec));
                    }
                    let Some(sb) = self.sbuf.as_mut() else {
                        continue;
                    };
                    sb.copy_interleaved_ref(buf);
                    let samples = sb.samples();
                    let first = self.decoded;
                    self.decoded += (samples.len() / n) as u64;
                    if self.first_nonfinite.is_none() {
                        if let Some(bad) = samples.iter().position(|x| !x.is_finite()) {
                            self.first_nonfinite = Some(first + (bad / n) as u64);
                        }
                    }
                    // A problem that rejects the file at the end is known: hand out nothing more.
                    if self.bad_packets > 0 || self.first_nonfinite.is_some() {
                        continue;
                    }
                    // The MP4 edit list: frames `skip .. skip + keep` of the decoded stream.
                    let (skip, keep) = self.edit;
                    let end = keep.map_or(u64::MAX, |k| skip.saturating_add(k));
                    let lo = skip.clamp(first, self.decoded);
                    let hi = end.clamp(first, self.decoded);
                    if lo >= hi {
                        continue;
                    }
                    let frames = &samples[((lo - first) as usize) * n..((hi - first) as usize) * n];
                    if n == 1 {
                        self.chunk.extend_from_slice(frames);
                    } else {
                        let scale = 1.0 / n as f32;
                        self.chunk.extend(
                            frames
                                .chunks_exact(n)
                                .map(|f| f.iter().sum::<f32>() * scale),
                        );
                    }
                    self.emitted += hi - lo;
                    return Ok(true);
                }
                Err(SymError::DecodeError(m)) => {
                    self.bad_packets += 1;
                    if self.first_error.is_empty() {
                        self.first_error = m.to_string();
                    }
                }
                Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.cut = true;
                    self.done = true;
                    break;
                }
                Err(e) => return Err(reject(format!("decode error: {e}"))),
            }
        }
        Ok(false)
    }
}

/// Decodes every packet of track `track_id`.
fn decode_packets(
    format: &mut dyn symphonia::core::formats::FormatReader,
    decoder: &mut dyn symphonia::core::codecs::Decoder,
    track_id: u32,
) -> Result<Packets, Rejection> {
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
            Err(SymError::ResetRequired) => {
                return Err(reject(
                    "unsupported: the stream changes its parameters mid-file",
                ))
            }
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
                    Some(c) if c != n => {
                        return Err(reject(format!(
                            "unsupported: the channel count changes mid-file ({c} → {n})"
                        )))
                    }
                    _ => {}
                }
                if buf.frames() == 0 {
                    continue;
                }
                let need = buf.capacity() as u64;
                if sbuf
                    .as_ref()
                    .is_none_or(|b| b.capacity() < buf.capacity() * n)
                {
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
    Ok(Packets {
        out,
        channels,
        packets,
        bad_packets,
        first_error,
        cut,
    })
}

/// Checks what was decoded against the header (truncation, corruption, non-finite samples) and
/// applies an MP4 edit list.
fn finish_decoding(
    path: &Path,
    d: Packets,
    params: &symphonia::core::codecs::CodecParameters,
    sample_rate: u32,
    codec: String,
) -> Result<PcmAudio, Rejection> {
    let Packets {
        mut out,
        channels,
        packets,
        bad_packets,
        first_error,
        cut,
    } = d;
    let channels = channels.or(params.channels.map(|c| c.count())).unwrap_or(1);
    let frames = out.len() / channels;
    if let Some(expected) = params.n_frames {
        // Lossy decoders may differ from the header by a frame's worth of priming or padding;
        // symphonia 0.5's AIFF reader counts the SSND offset fields as 2 extra frames.
        let slack = if is_lossless(&codec) { 8 } else { 4096 };
        if (frames as u64) + slack < expected {
            return Err(reject(format!("truncated: the header promises {expected} samples per channel, the file holds {frames}")));
        }
    }
    if frames == 0 {
        if bad_packets > 0 {
            return Err(reject(format!(
                "corrupt: none of {packets} packets decoded ({first_error})"
            )));
        }
        if cut {
            return Err(reject(format!(
                "truncated: the stream breaks off before its first samples ({first_error})"
            )));
        }
        return Err(reject("empty: no audio samples"));
    }
    if bad_packets > 0 {
        return Err(reject(format!(
            "corrupt: {bad_packets} of {packets} packets failed to decode ({first_error})"
        )));
    }
    if cut {
        return Err(reject(format!(
            "truncated: the stream breaks off after {frames} samples per channel{}",
            if first_error.is_empty() {
                String::new()
            } else {
                format!(" ({first_error})")
            }
        )));
    }
    if let Some(bad) = out.iter().position(|x| !x.is_finite()) {
        return Err(reject(format!(
            "non-finite samples (first at sample {})",
            bad / channels
        )));
    }
    // MP4/M4A: symphonia 0.5 parses but does not apply the edit list that trims the encoder's
    // priming (1024 samples for AAC-LC from ffmpeg, 2112 from Apple) and end padding.
    if codec == "aac" || codec == "alac" {
        if let Some((skip, keep)) = mp4_edit(path, sample_rate) {
            let skip = (skip as usize).min(frames);
            out.drain(..skip * channels);
            if let Some(keep) = keep {
                out.truncate((keep as usize).saturating_mul(channels).min(out.len()));
            }
        }
    }
    Ok(PcmAudio {
        sample_rate,
        channels,
        interleaved: out,
        codec,
    })
}

/// The first audio track's edit list of an MP4 file, in samples at `rate`:
/// (leading samples to skip, samples to keep). `None` if the file has no usable edit list.
pub fn mp4_edit(path: &Path, rate: u32) -> Option<(u64, Option<u64>)> {
    let data = std::fs::read(path).ok()?;
    fn boxes(d: &[u8]) -> Vec<(&[u8], &[u8])> {
        let mut out = Vec::new();
        let mut i = 0usize;
        while i + 8 <= d.len() {
            let size = u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]) as usize;
            let kind = &d[i + 4..i + 8];
            let (hdr, size) = if size == 1 && i + 16 <= d.len() {
                (
                    16,
                    u64::from_be_bytes(d[i + 8..i + 16].try_into().unwrap_or([0; 8])) as usize,
                )
            } else if size == 0 {
                (8, d.len() - i)
            } else {
                (8, size)
            };
            if size < hdr || i + size > d.len() {
                break;
            }
            out.push((kind, &d[i + hdr..i + size]));
            i += size;
        }
        out
    }
    let be32 = |b: &[u8], o: usize| -> Option<u64> {
        b.get(o..o + 4)
            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as u64)
    };
    let be64 = |b: &[u8], o: usize| -> Option<u64> {
        b.get(o..o + 8)
            .and_then(|x| x.try_into().ok())
            .map(u64::from_be_bytes)
    };
    // Timescale from mvhd/mdhd: version 0 at offset 12, version 1 at offset 20.
    let timescale = |b: &[u8]| -> Option<u64> {
        if *b.first()? == 1 {
            be32(b, 20)
        } else {
            be32(b, 12)
        }
    };
    let moov = boxes(&data).into_iter().find(|(k, _)| *k == b"moov")?.1;
    let movie_ts = boxes(moov)
        .into_iter()
        .find(|(k, _)| *k == b"mvhd")
        .and_then(|(_, b)| timescale(b))?;
    for (k, trak) in boxes(moov) {
        if k != b"trak" {
            continue;
        }
        let inner = boxes(trak);
        let Some(mdia) = inner
            .iter()
            .find(|(k, _)| *k == b"mdia")
            .map(|(_, b)| boxes(b))
        else {
            continue;
        };
        let is_audio = mdia
            .iter()
            .any(|(k, b)| *k == b"hdlr" && b.get(8..12) == Some(b"soun"));
        if !is_audio {
            continue;
        }
        let media_ts = mdia
            .iter()
            .find(|(k, _)| *k == b"mdhd")
            .and_then(|(_, b)| timescale(b))?;
        let edts = inner
            .iter()
            .find(|(k, _)| *k == b"edts")
            .map(|(_, b)| boxes(b))?;
        let elst = edts.iter().find(|(k, _)| *k == b"elst")?.1;
        let version = *elst.first()?;
        let count = be32(elst, 4)?;
        let mut off = 8usize;
        for _ in 0..count {
            let (dur, media_time, step) = if version == 1 {
                (be64(elst, off)?, be64(elst, off + 8)? as i64, 20)
            } else {
                (
                    be32(elst, off)?,
                    be32(elst, off + 4)? as u32 as i32 as i64,
                    12,
                )
            };
            off += step;
            if media_time < 0 {
                continue; // an empty edit (a delay), not a trim
            }
            if movie_ts == 0 || media_ts == 0 {
                return None;
            }
            let skip = media_time as u64 * rate as u64 / media_ts;
            let keep = (dur > 0).then(|| (dur as u128 * rate as u128 / movie_ts as u128) as u64);
            return Some((skip, keep));
        }
        return None;
    }
    None
}

/// Resamples mono audio from `from` Hz to `to` Hz with rubato's synchronous FFT resampler
/// (band-limited, anti-aliased). The output has `round(len · to / from)` samples; its timing
/// matches the input to within a fraction of an output sample (see the sox comparison test).
pub fn resample(input: &[f32], from: u32, to: u32) -> crate::Result<Vec<f32>> {
    use rubato::FftFixedInOut;
    if from == to || input.is_empty() {
        return Ok(input.to_vec());
    }
    let rs = FftFixedInOut::<f32>::new(from as usize, to as usize, 1024, 1)
        .map_err(|e| format!("resampler {from} → {to} Hz: {e}"))?;
    run_resampler(rs, input, from, to)
}

fn run_resampler<R: Resampler<f32>>(
    mut rs: R,
    input: &[f32],
    from: u32,
    to: u32,
) -> crate::Result<Vec<f32>> {
    let expected = ((input.len() as u128 * to as u128 + from as u128 / 2) / from as u128) as usize;
    let delay = rs.output_delay();
    let mut out: Vec<f32> = Vec::with_capacity(expected + delay + 8192);
    let mut obuf = rs.output_buffer_allocate(true);
    let mut pos = 0usize;
    loop {
        let need = rs.input_frames_next();
        if pos + need > input.len() {
            break;
        }
        let (used, n) = rs
            .process_into_buffer(&[&input[pos..pos + need]], &mut obuf, None)
            .map_err(|e| format!("resampling: {e}"))?;
        out.extend_from_slice(&obuf[0][..n]);
        pos += used;
    }
    if pos < input.len() {
        let (_, n) = rs
            .process_partial_into_buffer(Some(&[&input[pos..]]), &mut obuf, None)
            .map_err(|e| format!("resampling: {e}"))?;
        out.extend_from_slice(&obuf[0][..n]);
    }
    while out.len() < delay + expected {
        let (_, n) = rs
            .process_partial_into_buffer(None::<&[&[f32]]>, &mut obuf, None)
            .map_err(|e| format!("resampling: {e}"))?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&obuf[0][..n]);
    }
    out.drain(..delay.min(out.len()));
    out.truncate(expected);
    Ok(out)
}

/// [`resample`] for a stream: the input comes in pieces of any size, the output is appended as it
/// is ready. [`StreamResampler::push`] everything, then [`StreamResampler::finish`]: the output is
/// the very samples `resample` gives for the whole input at once (the same resampler sees the
/// same chunks in the same order), so a file cut into segments after resampling has no seam.
pub struct StreamResampler {
    rs: Option<rubato::FftFixedInOut<f32>>,
    from: u32,
    to: u32,
    pending: Vec<f32>,
    /// Input samples pushed.
    fed: u64,
    /// Output samples of the resampler so far, its delay included.
    raw: u64,
    /// Output samples handed out (after the delay).
    produced: u64,
    delay: usize,
    obuf: Vec<Vec<f32>>,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> crate::Result<StreamResampler> {
        let rs = if from == to {
            None
        } else {
            Some(
                rubato::FftFixedInOut::<f32>::new(from as usize, to as usize, 1024, 1)
                    .map_err(|e| format!("resampler {from} → {to} Hz: {e}"))?,
            )
        };
        let delay = rs.as_ref().map_or(0, |r| r.output_delay());
        let obuf = rs
            .as_ref()
            .map_or_else(Vec::new, |r| r.output_buffer_allocate(true));
        Ok(StreamResampler {
            rs,
            from,
            to,
            pending: Vec::new(),
            fed: 0,
            raw: 0,
            produced: 0,
            delay,
            obuf,
        })
    }

    fn take(&mut self, n: usize, out: &mut Vec<f32>) {
        let skip = (self.delay as u64).saturating_sub(self.raw).min(n as u64) as usize;
        self.raw += n as u64;
        out.extend_from_slice(&self.obuf[0][skip..n]);
        self.produced += (n - skip) as u64;
    }

    /// Resamples `input`, appending what is ready to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) -> crate::Result<()> {
        self.fed += input.len() as u64;
        let Some(rs) = self.rs.as_mut() else {
            out.extend_from_slice(input);
            return Ok(());
        };
        let need = rs.input_frames_next();
        if self.pending.is_empty() && input.len() < need {
            self.pending.extend_from_slice(input);
            return Ok(());
        }
        self.pending.extend_from_slice(input);
        let mut pos = 0usize;
        while self.pending.len() - pos >= need {
            let Some(rs) = self.rs.as_mut() else { break };
            let (used, n) = rs
                .process_into_buffer(&[&self.pending[pos..pos + need]], &mut self.obuf, None)
                .map_err(|e| format!("resampling: {e}"))?;
            self.take(n, out);
            pos += used;
        }
        self.pending.drain(..pos);
        Ok(())
    }

    /// Resamples what is left and the resampler's tail, appending to `out`; the whole output then
    /// has `round(len · to / from)` samples, as [`resample`]'s.
    pub fn finish(mut self, out: &mut Vec<f32>) -> crate::Result<()> {
        if self.rs.is_none() || self.fed == 0 {
            return Ok(());
        }
        let start = out.len();
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            if let Some(rs) = self.rs.as_mut() {
                let (_, n) = rs
                    .process_partial_into_buffer(Some(&[&pending[..]]), &mut self.obuf, None)
                    .map_err(|e| format!("resampling: {e}"))?;
                self.take(n, out);
            }
        }
        let (from, to) = (self.from as u128, self.to as u128);
        let expected = ((self.fed as u128 * to + from / 2) / from) as u64;
        while self.raw < self.delay as u64 + expected {
            let Some(rs) = self.rs.as_mut() else { break };
            let (_, n) = rs
                .process_partial_into_buffer(None::<&[&[f32]]>, &mut self.obuf, None)
                .map_err(|e| format!("resampling: {e}"))?;
            if n == 0 {
                break;
            }
            self.take(n, out);
        }
        if self.produced > expected {
            // Only what this call appended can be past the end (a whole chunk of input gives
            // exactly its share of output).
            let excess = ((self.produced - expected) as usize).min(out.len() - start);
            out.truncate(out.len() - excess);
        }
        Ok(())
    }
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
        let x: Vec<f32> = (0..48000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48000.0).sin() * 0.5)
            .collect();
        let y = resample(&x, 48000, 16000).unwrap();
        assert_eq!(y.len(), 16000);
        let want: Vec<f32> = (0..16000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16000.0).sin() * 0.5)
            .collect();
        // Away from the edges the resampled tone matches the analytic one closely.
        let err = y[500..15500]
            .iter()
            .zip(&want[500..15500])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 2e-3, "max error {err}");
        assert_eq!(resample(&x[..1000], 44100, 16000).unwrap().len(), 363);
    }

    #[test]
    fn streaming_resampler_gives_the_whole_file_resample_exactly() {
        // Pieces of any size (a packet, a sample, more than a resampler chunk) and rates up and
        // down: the concatenated output is bit for bit what `resample` gives for the whole input.
        let x: Vec<f32> = (0..40_000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 8_388_608.0) - 1.0)
            .collect();
        for (from, to) in [
            (44100, 16000),
            (48000, 16000),
            (8000, 16000),
            (16000, 16000),
        ] {
            for len in [0usize, 1, 999, 1024, 4097, 40_000] {
                let whole = resample(&x[..len], from, to).unwrap();
                for piece in [1usize, 7, 1152, 4096, 50_000] {
                    let mut rs = StreamResampler::new(from, to).unwrap();
                    let mut out = Vec::new();
                    for c in x[..len].chunks(piece) {
                        rs.push(c, &mut out).unwrap();
                    }
                    rs.finish(&mut out).unwrap();
                    assert!(
                        out == whole,
                        "{from}→{to} Hz, {len} samples in pieces of {piece}: {} vs {} samples",
                        out.len(),
                        whole.len()
                    );
                }
            }
        }
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
