package main

import (
	"bytes"
	"errors"
	"io"
)

// frame is one event of the stream. Its slices belong to the frameReader and are valid
// only until its next call of next.
type frame struct {
	name []byte // the event: field, empty when absent
	id   []byte // the id: field, empty when absent
	data []byte // the data: lines, joined by '\n'
}

// maxLine bounds one line of the stream. broker's event data is at most 64 KiB as sent, so a
// longer line means the stream is not what the load test expects.
const maxLine = 1 << 20

var errLineTooLong = errors.New("stream: a line longer than 1 MiB")

// frameReader parses the event stream as broker writes it (README "The event stream"):
// frames of "event:NAME\nid:N\ndata:JSON\n\n", and the keep-alive ":\n", a comment line
// that does not end a frame. It reads the body incrementally, in whatever pieces the network
// hands it, and follows the text/event-stream rules that apply to those frames: a line ends
// with "\n" (an "\r" before it is dropped), a line starting with ':' is a comment, one space
// after a field's colon is not part of its value, a blank line ends a frame, a blank line
// after nothing but comments ends nothing, and unknown fields (retry:) are ignored.
type frameReader struct {
	r          io.Reader
	buf        []byte // what was read; buf[start:end] is not parsed yet
	start, end int
	cur        frame
	pending    bool // cur has had a field since the last frame
	sawData    bool // cur has had a data line (perhaps an empty one)
}

// newFrameReader reads r with a buffer of size bytes, grown for longer lines.
func newFrameReader(r io.Reader, size int) *frameReader {
	return &frameReader{r: r, buf: make([]byte, max(size, 64))}
}

// next returns the next complete frame. At the end of the body it returns io.EOF (or the
// read error), and an unfinished frame is dropped, as an EventSource drops it.
func (fr *frameReader) next() (frame, error) {
	if !fr.pending {
		fr.cur.name, fr.cur.id, fr.cur.data = fr.cur.name[:0], fr.cur.id[:0], fr.cur.data[:0]
		fr.sawData = false
	}
	for {
		line, err := fr.line()
		if err != nil {
			return frame{}, err
		}
		if len(line) == 0 {
			if fr.pending {
				fr.pending = false // the next call starts a new frame
				return fr.cur, nil
			}
			continue
		}
		fr.field(line)
	}
}

// field applies one non-blank line to the frame being read.
func (fr *frameReader) field(line []byte) {
	if line[0] == ':' {
		return // a comment: the keep-alive
	}
	name, value, found := bytes.Cut(line, []byte(":"))
	if found && len(value) > 0 && value[0] == ' ' {
		value = value[1:]
	}
	switch string(name) {
	case "event":
		fr.cur.name = append(fr.cur.name[:0], value...)
	case "id":
		fr.cur.id = append(fr.cur.id[:0], value...)
	case "data":
		if fr.sawData {
			fr.cur.data = append(fr.cur.data, '\n')
		}
		fr.cur.data = append(fr.cur.data, value...)
		fr.sawData = true
	default:
		return // retry: and unknown fields
	}
	fr.pending = true
}

// line returns the next line without its line end, reading more of the body as needed. The
// slice is valid until the next call.
func (fr *frameReader) line() ([]byte, error) {
	for {
		if i := bytes.IndexByte(fr.buf[fr.start:fr.end], '\n'); i >= 0 {
			line := fr.buf[fr.start : fr.start+i]
			fr.start += i + 1
			return bytes.TrimSuffix(line, []byte("\r")), nil
		}
		// No whole line yet: move the unparsed part to the front, grow the buffer if the
		// line fills it, and read.
		fr.end = copy(fr.buf, fr.buf[fr.start:fr.end])
		fr.start = 0
		if fr.end == len(fr.buf) {
			if len(fr.buf) >= maxLine {
				return nil, errLineTooLong
			}
			grown := make([]byte, min(2*len(fr.buf), maxLine))
			copy(grown, fr.buf[:fr.end])
			fr.buf = grown
		}
		n, err := fr.r.Read(fr.buf[fr.end:])
		fr.end += n
		if n == 0 && err != nil {
			return nil, err
		}
	}
}
