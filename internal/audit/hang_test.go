package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// hangingWriter is a sink whose next Write blocks until release is closed
// (a disk or network filesystem that hangs); entered is closed when it does.
type hangingWriter struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	hang    bool
	entered chan struct{}
	release chan struct{}
}

func newHangingWriter() *hangingWriter {
	return &hangingWriter{hang: true, entered: make(chan struct{}), release: make(chan struct{})}
}

func (h *hangingWriter) Write(p []byte) (int, error) {
	h.mu.Lock()
	hang := h.hang
	h.hang = false
	h.mu.Unlock()
	if hang {
		close(h.entered)
		<-h.release
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.buf.Write(p)
}

func (h *hangingWriter) lines() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return bytes.Count(h.buf.Bytes(), []byte("\n"))
}

// guard is how long a test waits for a Write that must return on its own
// before declaring it stuck (a failure, not a speed measurement).
const guard = 10 * time.Second

// hangFirstWrite starts a Write that becomes the flusher and hangs in the
// sink, and returns its result channel once it is inside the sink.
func hangFirstWrite(t *testing.T, l *Log, h *hangingWriter) <-chan error {
	t.Helper()
	first := make(chan error, 1)
	go func() { first <- l.Write(context.Background(), validRecord("first")) }()
	select {
	case <-h.entered:
	case <-time.After(guard):
		t.Fatal("the first Write never reached the sink")
	}
	return first
}

// TestHungSinkBoundsWaits: while the flusher hangs in the sink, another
// writer's wait ends with its context (the caller is refused at its
// deadline instead of held forever), and its record, already queued, is
// still written once the sink comes back, although no writer waits for it
// any more.
func TestHungSinkBoundsWaits(t *testing.T) {
	h := newHangingWriter()
	l := NewWriter(h, Options{})
	first := hangFirstWrite(t, l, h)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	second := make(chan error, 1)
	go func() { second <- l.Write(ctx, validRecord("second")) }()
	select {
	case err := <-second:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Write behind a hung sink = %v, want context.DeadlineExceeded", err)
		}
	case <-time.After(guard):
		t.Fatal("Write behind a hung sink did not return when its context ended")
	}

	close(h.release)
	if err := <-first; err != nil {
		t.Errorf("the flusher's Write once the sink came back = %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if got := h.lines(); got != 2 {
		t.Errorf("lines written = %d, want 2 (the abandoned record is written once the sink is back)", got)
	}
}

// TestAppendQueuesWhateverTheContext: Append queues a record even when its
// context is already done (an outcome that must be on record), where Write
// refuses it.
func TestAppendQueuesWhateverTheContext(t *testing.T) {
	var w callWriter
	l := NewWriter(&w, Options{})
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Write(done, validRecord("w")); !errors.Is(err, context.Canceled) {
		t.Errorf("Write(canceled) = %v, want context.Canceled", err)
	}
	if err := l.Append(done, validRecord("a")); err != nil {
		t.Errorf("Append(canceled) = %v, want nil (queued and written at once)", err)
	}
	if len(w.calls) != 1 || !bytes.Contains(w.calls[0], []byte(`"request_id":"a"`)) {
		t.Errorf("sink got %q, want the Append record only", w.calls)
	}
}

// TestHungSinkBacklogBounded: records queued behind a hung flush stop at the
// backlog bound; later writers get ErrBacklog and their records are not
// written; what was queued is written when the sink comes back.
func TestHungSinkBacklogBounded(t *testing.T) {
	h := newHangingWriter()
	l := NewWriter(h, Options{})
	l.maxBacklog = 4 << 10
	first := hangFirstWrite(t, l, h)

	queued, refused := 0, 0
	for i := 0; i < 1000 && refused == 0; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // already done: Append queues, then returns at once
		switch err := l.Append(ctx, validRecord(fmt.Sprint("r", i))); {
		case errors.Is(err, ErrBacklog):
			refused++
		case errors.Is(err, context.Canceled):
			queued++
		default:
			t.Fatalf("Append %d behind a hung sink = %v", i, err)
		}
	}
	if refused == 0 || queued == 0 {
		t.Fatalf("behind a hung sink: %d queued, %d refused; want some of each", queued, refused)
	}
	close(h.release)
	if err := <-first; err != nil {
		t.Errorf("the flusher's Write = %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if got, want := h.lines(), 1+queued; got != want {
		t.Errorf("lines written = %d, want %d (the first and every queued record, none refused)", got, want)
	}
}
