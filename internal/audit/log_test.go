package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeClock returns successive times one millisecond apart, in a non-UTC
// zone so that the conversion to UTC is exercised.
func fakeClock() func() time.Time {
	var mu sync.Mutex
	t := time.Date(2026, 3, 1, 12, 0, 0, 123456789, time.FixedZone("X", 3600))
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(time.Millisecond)
		return t
	}
}

func validRecord(id string) Record {
	return Record{
		RequestID: id,
		Identity:  "spiffe://cairn.test/kms/us-east/kms1",
		Operation: "cairn.kms.v1.KMS/Encrypt",
		Target:    Target{Region: "us-east", Keyset: "payments", KeyVersion: 3},
		Outcome:   OutcomeOK,
	}
}

func openTemp(t *testing.T, opts Options) (*Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit", "audit.log")
	l, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%q) error = %v, want nil", path, err)
	}
	t.Cleanup(func() { _ = l.Close() }) // ErrClosed if the test closed it
	return l, path
}

func mustWrite(t *testing.T, l *Log, r Record) {
	t.Helper()
	if err := l.Write(t.Context(), r); err != nil {
		t.Fatalf("Write(%+v) error = %v, want nil", r, err)
	}
}

func mustRead(t *testing.T, path string) []Record {
	t.Helper()
	recs, err := ReadFile(path)
	if err != nil {
		t.Fatalf("ReadFile(%q) error = %v, want nil", path, err)
	}
	return recs
}

func TestRoundTrip(t *testing.T) {
	explicit := time.Date(2025, 12, 31, 23, 59, 59, 999999999, time.FixedZone("Y", -5*3600))
	in := []Record{
		validRecord("req-1"),
		{
			Time:      explicit,
			RequestID: "req-2",
			Identity:  "spiffe://cairn.test/regionctl/admin",
			Operation: "cairn.rootkms.v1.RootKMS/RotateKeyset",
			Target:    Target{Region: "eu-west", Keyset: "k", KeyVersion: 7, Resource: "keysets/k"},
			Outcome:   OutcomeAttempt,
		},
		{
			Operation: "cairn.kms.v1.KMS/Decrypt",
			Outcome:   OutcomeDenied,
			Code:      "Unauthenticated",
			Reason:    "no client certificate\nsecond line \"quoted\" <html> & \u2028",
		},
		{
			RequestID: "req-4",
			Identity:  "spiffe://cairn.test/kms/us-east/kms1",
			Operation: "cairn.kms.v1.KMS/Encrypt",
			Outcome:   OutcomeError,
			Code:      "Internal",
			Reason:    "keystore: keyset \"payments\" not loaded",
		},
	}
	want := make([]Record, len(in))
	check := fakeClock() // replays the times the log's clock will produce
	for i, r := range in {
		if r.Time.IsZero() {
			r.Time = check()
		}
		r.Time = r.Time.UTC()
		want[i] = r
	}

	for _, doSync := range []bool{false, true} {
		t.Run(fmt.Sprintf("sync=%t", doSync), func(t *testing.T) {
			clock := fakeClock()
			l, path := openTemp(t, Options{Sync: doSync, Now: clock})
			for _, r := range in {
				mustWrite(t, l, r)
			}
			if err := l.Close(); err != nil {
				t.Fatalf("Close() = %v, want nil", err)
			}
			got := mustRead(t, path)
			// Every record carries its chain link (TestChain checks them).
			for i := range got {
				if got[i].Prev == "" {
					t.Errorf("ReadFile(%q)[%d].Prev is empty, want a chain link", path, i)
				}
				got[i].Prev = ""
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("ReadFile(%q) mismatch (-want +got):\n%s", path, diff)
			}
			for i, r := range got {
				if r.Time.Location() != time.UTC {
					t.Errorf("ReadFile(%q)[%d].Time.Location() = %v, want UTC", path, i, r.Time.Location())
				}
			}

			// Reopening appends after the existing records.
			l2, err := Open(path, Options{Now: clock})
			if err != nil {
				t.Fatalf("Open(%q) again error = %v, want nil", path, err)
			}
			mustWrite(t, l2, validRecord("req-5"))
			if err := l2.Close(); err != nil {
				t.Fatalf("Close() = %v, want nil", err)
			}
			got = mustRead(t, path)
			if len(got) != len(in)+1 || got[len(in)].RequestID != "req-5" {
				t.Errorf("ReadFile after reopen and one Write = %d records ending %+v, want %d ending req-5",
					len(got), got[len(got)-1], len(in)+1)
			}
		})
	}
}

func TestReasonCap(t *testing.T) {
	cases := []struct {
		name, reason, want string
	}{
		{"short", "denied by policy", "denied by policy"},
		{"exactly max", strings.Repeat("a", MaxReasonLen), strings.Repeat("a", MaxReasonLen)},
		{"ascii over", strings.Repeat("a", 1000), strings.Repeat("a", MaxReasonLen)},
		// 3-byte runes: 512 is not a multiple of 3, so the cut backs off to 510.
		{"cut inside rune", strings.Repeat("€", 200), strings.Repeat("€", MaxReasonLen/3)},
		{"invalid utf-8", "bad \xff\xfe byte", "bad \uFFFD byte"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			l := NewWriter(&buf, Options{})
			r := validRecord("r")
			r.Reason = tc.reason
			if err := l.Write(t.Context(), r); err != nil {
				t.Fatalf("Write(reason %q) error = %v, want nil", tc.reason, err)
			}
			got, err := parseLine(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
			if err != nil {
				t.Fatalf("parseLine(%q) error = %v, want nil", buf.String(), err)
			}
			if got.Reason != tc.want {
				t.Errorf("written Reason for %q = %q (%d bytes), want %q (%d bytes)",
					tc.name, got.Reason, len(got.Reason), tc.want, len(tc.want))
			}
			if !utf8.ValidString(got.Reason) || len(got.Reason) > MaxReasonLen {
				t.Errorf("written Reason = %q, want valid UTF-8 of at most %d bytes", got.Reason, MaxReasonLen)
			}
		})
	}
}

func TestOpenCreatesPrivateFile(t *testing.T) {
	_, path := openTemp(t, Options{})
	for _, tc := range []struct {
		path string
		want os.FileMode
	}{
		{path, 0o600},
		{filepath.Dir(path), 0o700 | os.ModeDir},
	} {
		fi, err := os.Stat(tc.path)
		if err != nil {
			t.Fatalf("Stat(%q) error = %v", tc.path, err)
		}
		if got := fi.Mode(); got != tc.want {
			t.Errorf("Stat(%q).Mode() = %v, want %v", tc.path, got, tc.want)
		}
	}
}

func TestOpenRefusesUnsafePath(t *testing.T) {
	good := string(mustEncode(t, validRecord("existing")))
	cases := []struct {
		name  string
		setup func(t *testing.T, path string)
	}{
		{"mode 0644", func(t *testing.T, path string) { writeWithMode(t, path, good, 0o644) }},
		{"mode 0640", func(t *testing.T, path string) { writeWithMode(t, path, good, 0o640) }},
		{"mode 0606", func(t *testing.T, path string) { writeWithMode(t, path, good, 0o606) }},
		{"mode 0610", func(t *testing.T, path string) { writeWithMode(t, path, good, 0o610) }},
		{"directory", func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{"symlink to private file", func(t *testing.T, path string) {
			target := path + ".target"
			writeWithMode(t, target, good, 0o600)
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"fifo with mode 0600", func(t *testing.T, path string) {
			if err := syscall.Mkfifo(path, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"symlink to device", func(t *testing.T, path string) {
			if err := os.Symlink("/dev/null", path); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			tc.setup(t, path)
			before, _ := os.Lstat(path)
			l, err := Open(path, Options{})
			if err == nil {
				l.Close()
				t.Fatalf("Open(%s) error = nil, want an error", tc.name)
			}
			after, _ := os.Lstat(path)
			if before.Mode() != after.Mode() || before.Size() != after.Size() {
				t.Errorf("Open(%s) changed the path: mode %v size %d, want mode %v size %d",
					tc.name, after.Mode(), after.Size(), before.Mode(), before.Size())
			}
		})
	}
}

func TestOpenAcceptsPrivateFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	writeWithMode(t, path, string(mustEncode(t, validRecord("existing"))), 0o600)
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("Open(existing 0600 file) error = %v, want nil", err)
	}
	mustWrite(t, l, validRecord("new"))
	if err := l.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"existing", "new"}) {
		t.Errorf("ReadFile request IDs = %q, want [existing new]", got)
	}
}

func TestOpenLocksFile(t *testing.T) {
	l, path := openTemp(t, Options{})
	if l2, err := Open(path, Options{}); err == nil {
		l2.Close()
		t.Fatalf("second Open(%q) while the first is open: error = nil, want an error", path)
	}
	mustWrite(t, l, validRecord("first")) // the first Log is unaffected
	if err := l.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	l2, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("Open(%q) after Close error = %v, want nil", path, err)
	}
	if err := l2.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
}

func TestOpenRepairsTornTail(t *testing.T) {
	first := mustEncode(t, validRecord("one"))
	second := mustEncode(t, validRecord("two"))
	cases := []struct {
		name    string
		content string
		wantIDs []string
	}{
		{"torn after records", string(first) + string(second[:len(second)/2]), []string{"one", "new"}},
		{"torn only line", string(second[:10]), []string{"new"}},
		{"long torn line", string(first) + strings.Repeat("x", 10000), []string{"one", "new"}},
		{"intact", string(first) + string(second), []string{"one", "two", "new"}},
		{"empty", "", []string{"new"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			writeWithMode(t, path, tc.content, 0o600)
			l, err := Open(path, Options{})
			if err != nil {
				t.Fatalf("Open(%q) error = %v, want nil", path, err)
			}
			mustWrite(t, l, validRecord("new"))
			if err := l.Close(); err != nil {
				t.Fatalf("Close() = %v, want nil", err)
			}
			if got := ids(mustRead(t, path)); !slices.Equal(got, tc.wantIDs) {
				t.Errorf("ReadFile request IDs = %q, want %q", got, tc.wantIDs)
			}
		})
	}
}

func TestReadFileMalformed(t *testing.T) {
	good := string(mustEncode(t, validRecord("ok")))
	line := func(s string) string { return s + "\n" }
	cases := []struct {
		name     string
		content  string
		wantLine int
	}{
		{"torn last line", good + good[:20], 2},
		{"not json", good + line("hello"), 2},
		{"empty line", good + "\n" + good, 2},
		{"unknown field", line(`{"time":"2026-01-01T00:00:00Z","identity":"","operation":"op","outcome":"ok","key":"x"}`), 1},
		{"unknown outcome", line(`{"time":"2026-01-01T00:00:00Z","identity":"","operation":"op","outcome":"maybe"}`), 1},
		{"missing operation", line(`{"time":"2026-01-01T00:00:00Z","identity":"","outcome":"ok"}`), 1},
		{"missing time", good + line(`{"identity":"","operation":"op","outcome":"ok"}`), 2},
		{"control character", line(`{"time":"2026-01-01T00:00:00Z","identity":"a\u0007b","operation":"op","outcome":"ok"}`), 1},
		{"trailing data", good + good + line(`{"time":"2026-01-01T00:00:00Z","operation":"op","outcome":"ok"}}`), 3},
		{"two records on a line", line(strings.TrimSuffix(good, "\n") + good), 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			writeWithMode(t, path, tc.content, 0o600)
			recs, err := ReadFile(path)
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("ReadFile(%s) = %d records, error %v, want a *ParseError", tc.name, len(recs), err)
			}
			if pe.Line != tc.wantLine || pe.Path != path {
				t.Errorf("ReadFile(%s) error at %s:%d, want %s:%d", tc.name, pe.Path, pe.Line, path, tc.wantLine)
			}
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("ReadFile(%s) error = %v, want it to wrap ErrMalformed", tc.name, err)
			}
		})
	}
}

// TestDiskFull writes to /dev/full, which fails every write with ENOSPC.
func TestDiskFull(t *testing.T) {
	f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatalf("open /dev/full: %v", err)
	}
	defer f.Close()
	l := NewWriter(f, Options{})
	if err := l.Broken(); err != nil {
		t.Errorf("Broken() of a new log = %v, want nil", err)
	}
	err = l.Write(t.Context(), validRecord("r1"))
	if b := l.Broken(); !errors.Is(b, ErrBroken) || !errors.Is(b, syscall.ENOSPC) {
		t.Errorf("Broken() after a failed write = %v, want it to wrap ErrBroken and ENOSPC", b)
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Write to /dev/full = %v, want it to wrap ENOSPC", err)
	}
	if !errors.Is(err, ErrBroken) {
		t.Errorf("Write to /dev/full = %v, want it to wrap ErrBroken", err)
	}
	for i := range 3 {
		err := l.Write(t.Context(), validRecord("later"))
		if !errors.Is(err, ErrBroken) || !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("Write #%d after ENOSPC = %v, want it to wrap ErrBroken and ENOSPC", i+2, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close() = %v, want nil", err)
	}
}

func TestClosedFile(t *testing.T) {
	t.Run("NewWriter with closed file", func(t *testing.T) {
		f, err := os.CreateTemp(t.TempDir(), "audit")
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		l := NewWriter(f, Options{})
		err = l.Write(t.Context(), validRecord("r"))
		if !errors.Is(err, os.ErrClosed) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write to closed file = %v, want it to wrap os.ErrClosed and ErrBroken", err)
		}
		if err := l.Write(t.Context(), validRecord("r")); !errors.Is(err, ErrBroken) {
			t.Errorf("second Write = %v, want ErrBroken", err)
		}
	})
	t.Run("Open then file closed behind its back", func(t *testing.T) {
		l, path := openTemp(t, Options{})
		mustWrite(t, l, validRecord("before"))
		if err := l.f.Close(); err != nil {
			t.Fatal(err)
		}
		// The write fails and so does the truncate: the log breaks.
		err := l.Write(t.Context(), validRecord("after"))
		if !errors.Is(err, os.ErrClosed) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write after the file was closed = %v, want it to wrap os.ErrClosed and ErrBroken", err)
		}
		if err := l.Write(t.Context(), validRecord("after")); !errors.Is(err, ErrBroken) {
			t.Errorf("second Write = %v, want ErrBroken", err)
		}
		if err := l.Close(); err == nil {
			t.Errorf("Close() of a log whose file was closed = nil, want an error")
		}
		if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before"}) {
			t.Errorf("ReadFile request IDs = %q, want [before]", got)
		}
	})
}

// halfWriter writes the first half of each buffer to w and reports
// io.ErrShortWrite, like a write interrupted by a full disk. If after is set,
// it runs after the partial write.
type halfWriter struct {
	w     io.Writer
	after func()
}

func (h *halfWriter) Write(p []byte) (int, error) {
	n, err := h.w.Write(p[:len(p)/2])
	if h.after != nil {
		h.after()
	}
	if err != nil {
		return n, err
	}
	return n, io.ErrShortWrite
}

// liarWriter writes half of each buffer and reports success for that half.
type liarWriter struct{ w io.Writer }

func (l liarWriter) Write(p []byte) (int, error) { return l.w.Write(p[:len(p)/2]) }

func TestShortWrite(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(io.Writer) io.Writer
	}{
		{"error", func(w io.Writer) io.Writer { return &halfWriter{w: w} }},
		{"n < len without error", func(w io.Writer) io.Writer { return liarWriter{w} }},
	} {
		t.Run(tc.name+"/plain writer", func(t *testing.T) {
			var buf bytes.Buffer
			l := NewWriter(tc.wrap(&buf), Options{})
			err := l.Write(t.Context(), validRecord("r"))
			if !errors.Is(err, io.ErrShortWrite) || !errors.Is(err, ErrBroken) {
				t.Errorf("Write with a short write = %v, want it to wrap io.ErrShortWrite and ErrBroken", err)
			}
			if err := l.Write(t.Context(), validRecord("r")); !errors.Is(err, ErrBroken) {
				t.Errorf("Write after a short write = %v, want ErrBroken", err)
			}
		})
		t.Run(tc.name+"/file", func(t *testing.T) {
			l, path := openTemp(t, Options{})
			mustWrite(t, l, validRecord("before"))
			l.w = tc.wrap(l.f)
			err := l.Write(t.Context(), validRecord("torn"))
			if !errors.Is(err, io.ErrShortWrite) {
				t.Errorf("Write with a short write = %v, want it to wrap io.ErrShortWrite", err)
			}
			if errors.Is(err, ErrBroken) {
				t.Errorf("Write with a repairable short write = %v, want it not to wrap ErrBroken", err)
			}
			// The torn line was cut off: the file still parses.
			if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before"}) {
				t.Errorf("ReadFile request IDs after torn write = %q, want [before]", got)
			}
			// The log is still usable once the sink recovers.
			l.w = l.f
			mustWrite(t, l, validRecord("after"))
			if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before", "after"}) {
				t.Errorf("ReadFile request IDs = %q, want [before after]", got)
			}
		})
	}
}

// TestTornWriteUnrepairable tears a write and makes the truncation fail too:
// the log must break, and reopening must repair the file.
func TestTornWriteUnrepairable(t *testing.T) {
	l, path := openTemp(t, Options{})
	mustWrite(t, l, validRecord("before"))
	f := l.f
	l.w = &halfWriter{w: f, after: func() { f.Close() }}
	err := l.Write(t.Context(), validRecord("torn"))
	if !errors.Is(err, io.ErrShortWrite) || !errors.Is(err, os.ErrClosed) || !errors.Is(err, ErrBroken) {
		t.Errorf("Write with failed repair = %v, want it to wrap io.ErrShortWrite, os.ErrClosed and ErrBroken", err)
	}
	if err := l.Write(t.Context(), validRecord("later")); !errors.Is(err, ErrBroken) || !errors.Is(err, io.ErrShortWrite) {
		t.Errorf("Write on broken log = %v, want it to wrap ErrBroken and the original cause", err)
	}
	if _, err := ReadFile(path); !errors.Is(err, ErrMalformed) {
		t.Fatalf("ReadFile of torn file error = %v, want ErrMalformed", err)
	}
	l.Close()

	l2, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("reopen error = %v, want nil", err)
	}
	mustWrite(t, l2, validRecord("reopened"))
	if err := l2.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before", "reopened"}) {
		t.Errorf("ReadFile request IDs = %q, want [before reopened]", got)
	}
}

// syncWriter counts Sync calls and fails them when err is set.
type syncWriter struct {
	bytes.Buffer
	syncs int
	err   error
}

func (s *syncWriter) Sync() error {
	s.syncs++
	return s.err
}

func TestSync(t *testing.T) {
	t.Run("plain writer synced per record", func(t *testing.T) {
		var w syncWriter
		l := NewWriter(&w, Options{Sync: true})
		for range 3 {
			mustWrite(t, l, validRecord("r"))
		}
		if w.syncs != 3 {
			t.Errorf("Sync calls after 3 writes = %d, want 3", w.syncs)
		}
	})
	t.Run("plain writer not synced without Options.Sync", func(t *testing.T) {
		var w syncWriter
		l := NewWriter(&w, Options{})
		mustWrite(t, l, validRecord("r"))
		if w.syncs != 0 {
			t.Errorf("Sync calls = %d, want 0", w.syncs)
		}
	})
	t.Run("plain writer sync failure breaks", func(t *testing.T) {
		errSync := errors.New("sync failed")
		w := syncWriter{err: errSync}
		l := NewWriter(&w, Options{Sync: true})
		if err := l.Write(t.Context(), validRecord("r")); !errors.Is(err, errSync) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write with failing Sync = %v, want it to wrap the sync error and ErrBroken", err)
		}
		if err := l.Write(t.Context(), validRecord("r")); !errors.Is(err, ErrBroken) {
			t.Errorf("Write after failed Sync = %v, want ErrBroken", err)
		}
	})
	t.Run("file fsync failure breaks and removes the record", func(t *testing.T) {
		l, path := openTemp(t, Options{Sync: true})
		mustWrite(t, l, validRecord("before"))
		errSync := errors.New("fsync failed")
		realSync := l.fsync
		fails := 1
		l.fsync = func() error {
			if fails > 0 {
				fails--
				return errSync
			}
			return realSync()
		}
		err := l.Write(t.Context(), validRecord("unsynced"))
		if !errors.Is(err, errSync) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write with failing fsync = %v, want it to wrap the fsync error and ErrBroken", err)
		}
		if err := l.Write(t.Context(), validRecord("later")); !errors.Is(err, ErrBroken) || !errors.Is(err, errSync) {
			t.Errorf("Write after failed fsync = %v, want it to wrap ErrBroken and the fsync error", err)
		}
		// The record whose fsync failed was cut off again: its operation
		// was refused, so it must not appear as if it had happened.
		if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before"}) {
			t.Errorf("ReadFile request IDs = %q, want [before]", got)
		}
	})
	t.Run("file fsync failure after truncating a torn write breaks", func(t *testing.T) {
		l, path := openTemp(t, Options{Sync: true})
		mustWrite(t, l, validRecord("before"))
		errSync := errors.New("fsync failed")
		l.w = &halfWriter{w: l.f}
		l.fsync = func() error { return errSync }
		err := l.Write(t.Context(), validRecord("torn"))
		if !errors.Is(err, io.ErrShortWrite) || !errors.Is(err, errSync) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write with torn write and failing fsync = %v, want it to wrap io.ErrShortWrite, the fsync error and ErrBroken", err)
		}
		if got := ids(mustRead(t, path)); !slices.Equal(got, []string{"before"}) {
			t.Errorf("ReadFile request IDs = %q, want [before]", got)
		}
	})
	t.Run("file fsync failure with closed file breaks", func(t *testing.T) {
		l, _ := openTemp(t, Options{Sync: true})
		mustWrite(t, l, validRecord("before"))
		f := l.f
		// The whole record is written, then the file goes away, so fsync fails.
		l.w = writerFunc(func(p []byte) (int, error) {
			n, err := f.Write(p)
			f.Close()
			return n, err
		})
		err := l.Write(t.Context(), validRecord("unsynced"))
		if !errors.Is(err, os.ErrClosed) || !errors.Is(err, ErrBroken) {
			t.Errorf("Write with failing fsync = %v, want it to wrap os.ErrClosed and ErrBroken", err)
		}
		if err := l.Write(t.Context(), validRecord("later")); !errors.Is(err, ErrBroken) {
			t.Errorf("Write after failed fsync = %v, want ErrBroken", err)
		}
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// callWriter records every Write call separately.
type callWriter struct {
	mu    sync.Mutex
	calls [][]byte
}

func (c *callWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, bytes.Clone(p))
	return len(p), nil
}

func TestConcurrentWrites(t *testing.T) {
	const writers, perWriter = 8, 200
	writeAll := func(t *testing.T, l *Log) {
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() {
				for i := range perWriter {
					r := validRecord(fmt.Sprintf("w%d-%d", w, i))
					r.Reason = strings.Repeat(fmt.Sprintf("writer %d ", w), 20)
					if err := l.Write(context.Background(), r); err != nil {
						t.Errorf("Write(%s) error = %v, want nil", r.RequestID, err)
					}
				}
			})
		}
		wg.Wait()
	}
	wantIDs := func() []string {
		var want []string
		for w := range writers {
			for i := range perWriter {
				want = append(want, fmt.Sprintf("w%d-%d", w, i))
			}
		}
		slices.Sort(want)
		return want
	}()

	t.Run("file", func(t *testing.T) {
		l, path := openTemp(t, Options{Now: fakeClock()})
		writeAll(t, l)
		if err := l.Close(); err != nil {
			t.Fatalf("Close() = %v, want nil", err)
		}
		recs := mustRead(t, path) // strict: every line is one valid record
		got := ids(recs)
		slices.Sort(got)
		if diff := cmp.Diff(wantIDs, got); diff != "" {
			t.Errorf("request IDs in file mismatch (-want +got):\n%s", diff)
		}
		for i := 1; i < len(recs); i++ {
			if recs[i].Time.Before(recs[i-1].Time) {
				t.Errorf("record %d time %v is before record %d time %v", i, recs[i].Time, i-1, recs[i-1].Time)
			}
		}
	})
	t.Run("whole records per write call (group commit)", func(t *testing.T) {
		var w callWriter
		l := NewWriter(&w, Options{})
		writeAll(t, l)
		if len(w.calls) == 0 || len(w.calls) > writers*perWriter {
			t.Fatalf("Write calls = %d, want 1..%d", len(w.calls), writers*perWriter)
		}
		t.Logf("%d records in %d write calls", writers*perWriter, len(w.calls))
		var got []string
		for i, call := range w.calls {
			if len(call) == 0 || call[len(call)-1] != '\n' {
				t.Fatalf("Write call %d = %q, want whole lines ending in a newline", i, call)
			}
			for _, line := range bytes.Split(call[:len(call)-1], []byte("\n")) {
				r, err := parseLine(line)
				if err != nil {
					t.Fatalf("parseLine(line of call %d) error = %v, want nil", i, err)
				}
				got = append(got, r.RequestID)
			}
		}
		slices.Sort(got)
		if diff := cmp.Diff(wantIDs, got); diff != "" {
			t.Errorf("request IDs written mismatch (-want +got):\n%s", diff)
		}
	})
}

func TestInvalidRecords(t *testing.T) {
	long := strings.Repeat("a", MaxFieldLen+1)
	mod := func(f func(*Record)) Record {
		r := validRecord("r")
		f(&r)
		return r
	}
	cases := []struct {
		name string
		r    Record
	}{
		{"zero", Record{}},
		{"no operation", mod(func(r *Record) { r.Operation = "" })},
		{"no outcome", mod(func(r *Record) { r.Outcome = "" })},
		{"unknown outcome", mod(func(r *Record) { r.Outcome = "OK" })},
		{"newline in identity", mod(func(r *Record) { r.Identity = "spiffe://a/b\nforged" })},
		{"NUL in operation", mod(func(r *Record) { r.Operation = "op\x00" })},
		{"DEL in identity", mod(func(r *Record) { r.Identity = "spiffe://a/\x7f" })},
		{"C1 control in operation", mod(func(r *Record) { r.Operation = "op\u0085" })},
		{"escape in request id", mod(func(r *Record) { r.RequestID = "\x1b[31mred" })},
		{"control in code", mod(func(r *Record) { r.Code = "Internal\r" })},
		{"control in target", mod(func(r *Record) { r.Target.Keyset = "k\t" })},
		{"invalid utf-8 identity", mod(func(r *Record) { r.Identity = "spiffe://\xff" })},
		{"overlong identity", mod(func(r *Record) { r.Identity = long })},
		{"overlong resource", mod(func(r *Record) { r.Target.Resource = long })},
		{"unencodable time", mod(func(r *Record) { r.Time = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var w callWriter
			l := NewWriter(&w, Options{})
			if err := l.Write(t.Context(), tc.r); !errors.Is(err, ErrInvalidRecord) {
				t.Errorf("Write(%s) = %v, want ErrInvalidRecord", tc.name, err)
			}
			if len(w.calls) != 0 {
				t.Errorf("Write(%s) wrote %q, want nothing", tc.name, w.calls)
			}
			// A refused record does not break the log.
			mustWrite(t, l, validRecord("r"))
		})
	}
}

func TestJSONFields(t *testing.T) {
	full := Record{
		Time:      time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		RequestID: "req",
		Identity:  "spiffe://cairn.test/kms/us-east/kms1",
		Operation: "cairn.kms.v1.KMS/Encrypt",
		Target:    Target{Region: "us-east", Keyset: "k", KeyVersion: 1, Resource: "res"},
		Outcome:   OutcomeError,
		Code:      "Internal",
		Reason:    "boom",
	}
	cases := []struct {
		name       string
		r          Record
		wantKeys   []string
		wantTarget []string
	}{
		{"full", full,
			[]string{"code", "identity", "operation", "outcome", "prev", "reason", "request_id", "target", "time"},
			[]string{"key_version", "keyset", "region", "resource"}},
		{"minimal", Record{Operation: "op", Outcome: OutcomeOK},
			[]string{"identity", "operation", "outcome", "prev", "time"}, nil},
		{"partial target", Record{Operation: "op", Outcome: OutcomeOK, Target: Target{Keyset: "k"}},
			[]string{"identity", "operation", "outcome", "prev", "target", "time"}, []string{"keyset"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			mustWrite(t, NewWriter(&buf, Options{}), tc.r)
			var m map[string]any
			if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
				t.Fatalf("json.Unmarshal(%q) error = %v", buf.String(), err)
			}
			if got := slices.Sorted(maps.Keys(m)); !slices.Equal(got, tc.wantKeys) {
				t.Errorf("JSON keys of %s = %q, want %q", tc.name, got, tc.wantKeys)
			}
			if tc.wantTarget == nil {
				return
			}
			target, ok := m["target"].(map[string]any)
			if !ok {
				t.Fatalf("JSON target of %s = %#v, want an object", tc.name, m["target"])
			}
			if got := slices.Sorted(maps.Keys(target)); !slices.Equal(got, tc.wantTarget) {
				t.Errorf("JSON target keys of %s = %q, want %q", tc.name, got, tc.wantTarget)
			}
		})
	}
	t.Run("no HTML escaping", func(t *testing.T) {
		var buf bytes.Buffer
		r := validRecord("r")
		r.Reason = "a<b>&c"
		mustWrite(t, NewWriter(&buf, Options{}), r)
		if want := `"reason":"a<b>&c"`; !strings.Contains(buf.String(), want) {
			t.Errorf("JSON line = %s, want it to contain %s", buf.String(), want)
		}
	})
	t.Run("time format", func(t *testing.T) {
		var buf bytes.Buffer
		mustWrite(t, NewWriter(&buf, Options{}), full)
		var m map[string]any
		if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
			t.Fatal(err)
		}
		if got, want := m["time"], "2026-01-02T03:04:05.000000006Z"; got != want {
			t.Errorf("JSON time = %v, want %q", got, want)
		}
	})
}

func TestClose(t *testing.T) {
	for _, tc := range []struct {
		name string
		open func(t *testing.T) *Log
	}{
		{"file", func(t *testing.T) *Log { l, _ := openTemp(t, Options{}); return l }},
		{"writer", func(t *testing.T) *Log { return NewWriter(io.Discard, Options{}) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.open(t)
			if err := l.Close(); err != nil {
				t.Fatalf("Close() = %v, want nil", err)
			}
			if err := l.Write(t.Context(), validRecord("r")); !errors.Is(err, ErrClosed) {
				t.Errorf("Write after Close = %v, want ErrClosed", err)
			}
			if err := l.Close(); !errors.Is(err, ErrClosed) {
				t.Errorf("second Close() = %v, want ErrClosed", err)
			}
		})
	}
	t.Run("NewWriter leaves writer open", func(t *testing.T) {
		f, err := os.CreateTemp(t.TempDir(), "sink")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		l := NewWriter(f, Options{})
		if err := l.Close(); err != nil {
			t.Fatalf("Close() = %v, want nil", err)
		}
		if _, err := f.Write([]byte("x")); err != nil {
			t.Errorf("write to the sink after Log.Close = %v, want nil", err)
		}
	})
}

func TestContextDone(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Unix(1, 0))
	defer cancel2()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		want error
	}{
		{"canceled", canceled, context.Canceled},
		{"deadline exceeded", expired, context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w callWriter
			l := NewWriter(&w, Options{})
			if err := l.Write(tc.ctx, validRecord("r")); !errors.Is(err, tc.want) {
				t.Errorf("Write(%s ctx) = %v, want %v", tc.name, err, tc.want)
			}
			if len(w.calls) != 0 {
				t.Errorf("Write(%s ctx) wrote %q, want nothing", tc.name, w.calls)
			}
		})
	}
}

// TestContextCanceledWhileWaiting cancels the context while Write waits for
// the log's lock: the record must not be written.
func TestContextCanceledWhileWaiting(t *testing.T) {
	var w callWriter
	l := NewWriter(&w, Options{})
	ctx, cancel := context.WithCancel(t.Context())
	l.mu.Lock() // as if another Write were in progress
	done := make(chan error)
	go func() { done <- l.Write(ctx, validRecord("r")) }()
	cancel()
	l.mu.Unlock()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Write(ctx canceled while waiting) = %v, want context.Canceled", err)
	}
	if len(w.calls) != 0 {
		t.Errorf("Write(ctx canceled while waiting) wrote %q, want nothing", w.calls)
	}
}

func TestClock(t *testing.T) {
	fixed := time.Date(2026, 5, 6, 7, 8, 9, 10, time.FixedZone("Z", 7200))
	explicit := time.Date(2020, 1, 1, 0, 0, 0, 0, time.FixedZone("W", -3600))
	for _, tc := range []struct {
		name string
		in   time.Time
		want time.Time
	}{
		{"zero uses clock", time.Time{}, fixed.UTC()},
		{"explicit kept", explicit, explicit.UTC()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			l := NewWriter(&buf, Options{Now: func() time.Time { return fixed }})
			r := validRecord("r")
			r.Time = tc.in
			mustWrite(t, l, r)
			got, err := parseLine(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
			if err != nil {
				t.Fatal(err)
			}
			if !got.Time.Equal(tc.want) || got.Time.Location() != time.UTC {
				t.Errorf("written Time for %v = %v, want %v", tc.in, got.Time, tc.want)
			}
		})
	}
	t.Run("nil Now uses time.Now", func(t *testing.T) {
		var buf bytes.Buffer
		before := time.Now()
		mustWrite(t, NewWriter(&buf, Options{}), validRecord("r"))
		after := time.Now()
		got, err := parseLine(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
		if err != nil {
			t.Fatal(err)
		}
		if got.Time.Before(before.Truncate(0)) || got.Time.After(after.Truncate(0)) {
			t.Errorf("written Time = %v, want between %v and %v", got.Time, before, after)
		}
	})
}

func BenchmarkWrite(b *testing.B) {
	for _, doSync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync=%t", doSync), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"), Options{Sync: doSync})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			r := validRecord("bench-request-id")
			r.Reason = "benchmark"
			ctx := b.Context()
			b.ReportAllocs()
			for b.Loop() {
				if err := l.Write(ctx, r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func mustEncode(t *testing.T, r Record) []byte {
	t.Helper()
	if r.Time.IsZero() {
		r.Time = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	}
	line, err := encode(r)
	if err != nil {
		t.Fatalf("encode(%+v) error = %v", r, err)
	}
	return line
}

// writeWithMode writes content to path and sets its mode exactly (the umask
// would otherwise mask it).
func writeWithMode(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func ids(recs []Record) []string {
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = r.RequestID
	}
	return out
}

// slowWriter takes a while per write call, like an fsync'd disk.
type slowWriter struct {
	mu    sync.Mutex
	calls int
	buf   bytes.Buffer
}

func (s *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(2 * time.Millisecond)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	return s.buf.Write(p)
}

// TestGroupCommit: concurrent writers behind a slow sink share write calls,
// and every record still arrives whole, once.
func TestGroupCommit(t *testing.T) {
	var w slowWriter
	l := NewWriter(&w, Options{})
	const writers, each = 32, 10
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			for j := range each {
				if err := l.Write(context.Background(), validRecord(fmt.Sprintf("w%d-%d", i, j))); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	lines := bytes.Split(bytes.TrimSuffix(w.buf.Bytes(), []byte("\n")), []byte("\n"))
	if len(lines) != writers*each {
		t.Fatalf("%d lines, want %d", len(lines), writers*each)
	}
	if w.calls > writers*each/4 {
		t.Errorf("%d write calls for %d records from %d writers, want batching (at most a quarter as many calls)", w.calls, writers*each, writers)
	}
}

// BenchmarkWriteParallel measures audit throughput with many concurrent
// writers (the KMS data path): group commit shares one write, and with Sync
// one fsync, among all records queued meanwhile.
func BenchmarkWriteParallel(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync=%v", sync), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"), Options{Sync: sync})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			b.SetParallelism(32)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := l.Write(context.Background(), validRecord("bench")); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
		})
	}
}
