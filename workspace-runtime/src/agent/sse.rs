//! Server-Sent Events as the model APIs stream them: frames end at a blank line; a frame's
//! `event:` names it and its `data:` lines (joined by newlines) carry it; comments (`:`) and
//! other fields are ignored. Pure: bytes in (in whatever pieces the network gives them),
//! frames out.

/// Bytes a frame may take before the stream is refused: a server that never ends a frame
/// cannot grow the buffer without bound.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

/// A frame longer than [`MAX_FRAME_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a server-sent event longer than {MAX_FRAME_BYTES} bytes")]
pub struct FrameTooLong;

impl Decoder {
    /// Adds `chunk` and returns the frames it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Frame>, FrameTooLong> {
        self.buffer.extend_from_slice(chunk);
        let mut frames = Vec::new();
        while let Some((end, separator)) = blank_line(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end + separator).collect();
            if let Some(frame) = parse(&String::from_utf8_lossy(&raw[..end])) {
                frames.push(frame);
            }
        }
        if self.buffer.len() > MAX_FRAME_BYTES {
            return Err(FrameTooLong);
        }
        Ok(frames)
    }
}

/// Where the first blank line starts, and the length of the line breaks that make it.
fn blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = find(buffer, b"\n\n").map(|i| (i, 2));
    let crlf = find(buffer, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A frame's fields; `None` when it has no data (a comment or a keep-alive).
fn parse(text: &str) -> Option<Frame> {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    (!data.is_empty()).then(|| Frame {
        event,
        data: data.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_reassembled_across_any_chunking() {
        let stream = b": keep-alive\n\nevent: response.created\ndata: {\"a\":1}\n\n\
                       event: response.output_text.delta\r\ndata: {\"delta\":\r\ndata: \"hi\"}\r\n\r\n\
                       data: last\n\n";
        let expected = vec![
            Frame {
                event: Some("response.created".into()),
                data: "{\"a\":1}".into(),
            },
            Frame {
                event: Some("response.output_text.delta".into()),
                data: "{\"delta\":\n\"hi\"}".into(),
            },
            Frame {
                event: None,
                data: "last".into(),
            },
        ];
        for size in 1..stream.len() {
            let mut decoder = Decoder::default();
            let mut frames = Vec::new();
            for chunk in stream.chunks(size) {
                frames.extend(decoder.push(chunk).expect("frames"));
            }
            assert_eq!(frames, expected, "in chunks of {size}");
        }
    }

    #[test]
    fn a_frame_that_never_ends_is_refused() {
        let mut decoder = Decoder::default();
        let big = vec![b'x'; MAX_FRAME_BYTES + 1];
        assert_eq!(decoder.push(&big), Err(FrameTooLong));
    }
}
