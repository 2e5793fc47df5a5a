package main

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// piecesReader hands out its text at most size bytes per Read, as a network may.
type piecesReader struct {
	text string
	size int
}

func (r *piecesReader) Read(p []byte) (int, error) {
	if r.text == "" {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.size)], r.text)
	r.text = r.text[n:]
	return n, nil
}

type wantFrame struct{ name, id, data string }

// readAll reads every frame of r until its error.
func readAll(t *testing.T, fr *frameReader) ([]wantFrame, error) {
	t.Helper()
	var got []wantFrame
	for {
		f, err := fr.next()
		if err != nil {
			return got, err
		}
		got = append(got, wantFrame{string(f.name), string(f.id), string(f.data)})
		if len(got) > 100 {
			t.Fatal("too many frames")
		}
	}
}

func TestFrameReaderBrokerStream(t *testing.T) {
	// broker's frames, its keep-alive between them and at the start, and a frame cut by the
	// end of the body, which is dropped.
	stream := ":\n" +
		"event:bench\nid:1\ndata:{\"ts\":17}\n\n" +
		":\n" +
		":\n" +
		"event:news\nid:2\ndata:{\"title\":\"h\\u00e9llo\",\"t\":\"a:b\"}\n\n" +
		"event:bench\nid:3\ndata:{}\n\n" +
		"event:bench\nid:4\nda"
	want := []wantFrame{
		{"bench", "1", `{"ts":17}`},
		{"news", "2", `{"title":"h\u00e9llo","t":"a:b"}`},
		{"bench", "3", `{}`},
	}
	// Every piece size, from one byte at a time to the whole stream in one read, with a
	// buffer smaller than a frame (it grows), so frames and lines are split at every place.
	for size := 1; size <= len(stream); size++ {
		fr := newFrameReader(&piecesReader{text: stream, size: size}, 8)
		got, err := readAll(t, fr)
		if err != io.EOF {
			t.Fatalf("pieces of %d: error %v, want EOF", size, err)
		}
		if len(got) != len(want) {
			t.Fatalf("pieces of %d: %d frames %q, want %q", size, len(got), got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("pieces of %d: frame %d = %q, want %q", size, i, got[i], want[i])
			}
		}
	}
}

func TestFrameReaderRules(t *testing.T) {
	stream := "" +
		": comment\n\n" + // a blank line after nothing but a comment ends no frame
		"event: spaced\r\nid: 5\r\ndata: one\r\ndata:two\r\n\r\n" + // CRLF, one space dropped, data lines joined
		"retry:100\nunknown:x\ndata\n\n" + // retry and unknown fields ignored; "data" alone is an empty data line
		"id:6\n\n" + // a frame of an id only
		"\n\n" // stray blank lines
	want := []wantFrame{
		{"spaced", "5", "one\ntwo"},
		{"", "", ""},
		{"", "6", ""},
	}
	got, err := readAll(t, newFrameReader(strings.NewReader(stream), 64))
	if err != io.EOF || len(got) != len(want) {
		t.Fatalf("frames %q, error %v; want %q", got, err, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("frame %d = %q, want %q", i, got[i], want[i])
		}
	}
}

func TestFrameReaderLongLines(t *testing.T) {
	data := strings.Repeat("x", 200_000)
	fr := newFrameReader(strings.NewReader("id:1\ndata:"+data+"\n\n"), 64)
	f, err := fr.next()
	if err != nil || string(f.data) != data {
		t.Fatalf("a 200 kB line: %d bytes, %v", len(f.data), err)
	}
	fr = newFrameReader(strings.NewReader("data:"+strings.Repeat("x", maxLine)+"\n\n"), 64)
	if _, err := fr.next(); !errors.Is(err, errLineTooLong) {
		t.Fatalf("a line over 1 MiB: %v, want errLineTooLong", err)
	}
}
