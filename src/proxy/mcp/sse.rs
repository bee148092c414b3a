//! Server-sent events: an incremental parser for the upstream's streams and the encoder for the
//! client's (the WHATWG "event stream" format that MCP's HTTP transports use).

use bytes::{BufMut as _, Bytes, BytesMut};

/// Longest line the parser buffers; a longer one ends the stream as malformed rather than
/// growing without bound.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event. `data` lines are joined with `\n`, as a client joins them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
}

impl Event {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.data.as_ref().map_or(0, String::len) + 64);
        if let Some(id) = &self.id {
            field(&mut out, "id", id);
        }
        if let Some(event) = &self.event {
            field(&mut out, "event", event);
        }
        if let Some(retry) = self.retry {
            field(&mut out, "retry", &retry.to_string());
        }
        if let Some(data) = &self.data {
            for line in data.split('\n') {
                field(&mut out, "data", line);
            }
        }
        out.put_u8(b'\n');
        out.freeze()
    }
}

fn field(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_u8(b'\n');
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an event-stream line is longer than {MAX_LINE_BYTES} bytes")]
pub struct LineTooLong;

/// Turns chunks of an event stream into events, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` opening the next one belongs to it.
    after_cr: bool,
    pending: Event,
    /// Any field seen since the last dispatch.
    started: bool,
}

impl Parser {
    pub fn feed(&mut self, chunk: &[u8], events: &mut Vec<Event>) -> Result<(), LineTooLong> {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let terminator = rest[end];
            rest = &rest[end + 1..];
            if terminator == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
            let line = std::mem::take(&mut self.line);
            self.line_complete(&line, events);
        }
        self.line.extend_from_slice(rest);
        if self.line.len() > MAX_LINE_BYTES {
            return Err(LineTooLong);
        }
        Ok(())
    }

    fn line_complete(&mut self, line: &[u8], events: &mut Vec<Event>) {
        if line.is_empty() {
            if std::mem::take(&mut self.started) {
                events.push(std::mem::take(&mut self.pending));
            }
            return;
        }
        if line[0] == b':' {
            return; // A comment: keep-alive padding, never forwarded as an event.
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        self.started = true;
        match name {
            b"data" => match &mut self.pending.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.pending.data = Some(value.into_owned()),
            },
            b"event" => self.pending.event = Some(value.into_owned()),
            // An id containing NUL is ignored, as the format requires.
            b"id" if !value.contains('\0') => self.pending.id = Some(value.into_owned()),
            b"retry" => self.pending.retry = value.parse().ok().or(self.pending.retry),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut events).unwrap();
        }
        events
    }

    #[test]
    fn events_survive_any_chunking_and_any_line_ending() {
        let stream = b"id: 7\r\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n: ping\n\nretry: 500\ndata:x\r\r";
        let expected = vec![
            Event {
                id: Some("7".into()),
                event: Some("message".into()),
                data: Some("{\"a\":\n1}".into()),
                retry: None,
            },
            Event {
                retry: Some(500),
                data: Some("x".into()),
                ..Default::default()
            },
        ];
        assert_eq!(parse(&[stream]), expected);
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(parse(&[a, b]), expected, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse(&bytes), expected);
    }

    #[test]
    fn encoding_round_trips() {
        let event = Event {
            id: Some("p1-2".into()),
            event: Some("message".into()),
            data: Some("line one\nline two".into()),
            retry: Some(1000),
        };
        assert_eq!(parse(&[&event.encode()]), vec![event]);
        let bare_retry = Event {
            retry: Some(250),
            ..Default::default()
        };
        assert_eq!(&bare_retry.encode()[..], b"retry: 250\n\n");
    }

    #[test]
    fn hostile_lines_are_bounded_and_ids_with_nul_ignored() {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        let long = vec![b'a'; MAX_LINE_BYTES + 1];
        assert_eq!(parser.feed(&long, &mut events), Err(LineTooLong));
        assert_eq!(parse(&[b"id: a\0b\ndata: x\n\n"])[0].id, None);
        assert_eq!(
            parse(&[b"data\n\n"])[0].data.as_deref(),
            Some(""),
            "a field without a colon has an empty value"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 1000, ..Default::default() })]
        /// An upstream's stream, cut anywhere: the events it encodes come out whole; arbitrary
        /// bytes never panic the parser.
        #[test]
        fn encoded_events_parse_back_whatever_the_chunks(
            events in proptest::collection::vec(
                (proptest::option::of("[^\\r\\n\\x00]{1,16}"), proptest::option::of("[a-z]{1,8}"),
                 "[^\\r\\x00]{0,40}", proptest::option::of(0_u64..100_000)),
                1..5),
            cuts in proptest::collection::vec(0_usize..400, 0..6),
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let events: Vec<Event> = events
                .into_iter()
                .map(|(id, event, data, retry)| Event { id: id.map(|i| i.trim_start().to_owned()).filter(|i| !i.is_empty()), event, data: Some(data), retry })
                .collect();
            let stream: Vec<u8> = events.iter().flat_map(|e| e.encode().to_vec()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                chunks.push(&stream[from..cut]);
                from = cut;
            }
            proptest::prop_assert_eq!(parse(&chunks), events);

            let mut parser = Parser::default();
            let mut out = Vec::new();
            for chunk in noise.chunks(7) {
                let _ = parser.feed(chunk, &mut out);
            }
        }
    }
}
