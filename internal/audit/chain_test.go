package audit

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/devca"
)

const signerID = "spiffe://cairn.test/kms/us-east/kms-1"

// testSigner is a dev CA and an X.509-SVID of signerID it issued.
type testSigner struct {
	ca    *devca.CA
	key   crypto.Signer
	certs []*x509.Certificate
}

func newTestSigner(t testing.TB) *testSigner {
	t.Helper()
	ca, err := devca.New(spiffeid.RequireTrustDomainFromString("cairn.test"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue(spiffeid.RequireFromString(signerID), devca.LeafOptions{})
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(leaf.KeyPEM)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return &testSigner{ca: ca, key: k.(crypto.Signer), certs: []*x509.Certificate{leaf.Cert}}
}

func (s *testSigner) signer() func() (crypto.Signer, []*x509.Certificate, error) {
	return func() (crypto.Signer, []*x509.Certificate, error) { return s.key, s.certs, nil }
}

func (s *testSigner) roots() []*x509.Certificate { return []*x509.Certificate{s.ca.Certificate()} }

// writeLog opens path with opts, writes n records with request IDs
// prefix-0..., and closes it.
func writeLog(t *testing.T, path string, opts Options, prefix string, n int) {
	t.Helper()
	l, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		mustWrite(t, l, validRecord(fmt.Sprintf("%s-%d", prefix, i)))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func verify(t *testing.T, opts VerifyOptions, paths ...string) *Report {
	t.Helper()
	rep, err := VerifyFiles(paths, opts)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func mustVerifyOK(t *testing.T, opts VerifyOptions, paths ...string) *Report {
	t.Helper()
	rep := verify(t, opts, paths...)
	if !rep.OK() {
		t.Fatalf("VerifyFiles(%v) problems = %v, want none", paths, rep.Problems)
	}
	return rep
}

func readLines(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for l := range bytes.Lines(b) {
		out = append(out, l)
	}
	return out
}

func writeLines(t *testing.T, path string, lines [][]byte) {
	t.Helper()
	if err := os.WriteFile(path, bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestChainVerifies: records written with checkpoints verify, with and
// without the CA, and every line links to the one before it.
func TestChainVerifies(t *testing.T) {
	s := newTestSigner(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLog(t, path, Options{Signer: s.signer(), CheckpointEvery: 3}, "r", 10)
	rep := mustVerifyOK(t, VerifyOptions{Roots: s.roots()}, path)
	// 10 records, a checkpoint after every third (3), and the final one.
	if rep.Records != 10 || rep.Checkpoints != 4 || !rep.Final || rep.Unsigned != 0 || !strings.Contains(rep.Start, path+":1: a new chain") {
		t.Errorf("VerifyFiles = %+v, want 10 records, 4 checkpoints, final, a new chain at line 1", rep)
	}
	if s := rep.Summary(); !strings.HasPrefix(s, "intact: 1 files, 10 records, 4 checkpoints") {
		t.Errorf("Summary = %q", s)
	}
	recs, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if recs[0].Prev != ChainStart {
		t.Errorf("first record's Prev = %q, want ChainStart", recs[0].Prev)
	}
	other := newTestSigner(t)
	if rep := verify(t, VerifyOptions{Roots: other.roots()}, path); rep.OK() || !strings.Contains(rep.Problems[0].Msg, "does not verify against the CA bundle") {
		t.Errorf("VerifyFiles against another CA = %v, want a CA bundle problem", rep.Problems)
	}
}

// TestVerifyFindsTampering: a deleted, moved, edited or cut record is found
// at the exact line.
func TestVerifyFindsTampering(t *testing.T) {
	s := newTestSigner(t)
	orig := filepath.Join(t.TempDir(), "audit.log")
	writeLog(t, orig, Options{Signer: s.signer(), CheckpointEvery: 4}, "r", 12)
	lines := readLines(t, orig)
	// Lines: r-0..r-3 (1-4), checkpoint (5), r-4..r-7 (6-9), checkpoint
	// (10), r-8..r-11 (11-14), checkpoint (15), final checkpoint (16).
	if len(lines) != 16 {
		t.Fatalf("%d lines, want 16", len(lines))
	}
	edit := func(i int, f func([]byte) []byte) [][]byte {
		out := append([][]byte(nil), lines...)
		out[i] = f(append([]byte(nil), out[i]...))
		return out
	}
	for _, tc := range []struct {
		name     string
		lines    [][]byte
		wantLine int
		wantMsg  string
		wantRID  string
	}{
		{"delete a record", append(append([][]byte(nil), lines[:6]...), lines[7:]...), 7, "does not link to line 6", "r-6"},
		// The chain then seems to continue from an earlier file:
		// Start says so (checked below).
		{"delete the first record", lines[1:], -1, "", ""},
		{"reorder two records", append(append(append([][]byte(nil), lines[:6]...), lines[7], lines[6]), lines[8:]...), 7, "does not link to line 6", "r-6"},
		{"edit one byte of a field", edit(6, func(b []byte) []byte {
			i := bytes.Index(b, []byte(`"r-5"`))
			b[i+1] = 'x'
			return b
		}), 8, "does not link to line 7", "r-6"},
		// The edited line may still parse (then the next one does not
		// link to it) or not: either way line 7 is named.
		{"edit one byte in the middle", edit(6, func(b []byte) []byte { b[len(b)/2] ^= 0x01; return b }), 7, "line 7", ""},
		{"cut a record in the middle", edit(6, func(b []byte) []byte { return append(b[:len(b)/2], '\n') }), 7, "not a valid record", ""},
		{"truncated file", append(append([][]byte(nil), lines[:6]...), lines[6][:20]), 7, "incomplete last line", ""},
		{"delete records covered by a checkpoint", append(append([][]byte(nil), lines[:11]...), lines[13:]...), 12, "does not link to line 11", "r-11"},
		{"delete the last records and their checkpoints", lines[:13], 0, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit.log")
			writeLines(t, path, tc.lines)
			rep := verify(t, VerifyOptions{Roots: s.roots()}, path)
			if tc.wantLine == 0 {
				// A cut at the end is not a broken chain, but the
				// report says the log does not end with a final
				// checkpoint and how many records no checkpoint covers.
				if !rep.OK() || rep.Final || rep.Unsigned != 3 {
					t.Errorf("VerifyFiles = %+v, want OK, not final, 3 unsigned", rep)
				}
				return
			}
			if tc.wantLine < 0 {
				if !rep.OK() || !strings.Contains(rep.Start, path+":1: the chain continues from a record before this file") {
					t.Errorf("VerifyFiles = %+v, want Start to say the chain begins before %s:1", rep, path)
				}
				return
			}
			if rep.OK() {
				t.Fatalf("VerifyFiles(%s) = OK, want a problem at line %d", tc.name, tc.wantLine)
			}
			p := rep.Problems[0]
			if tc.name == "edit one byte in the middle" {
				if p.Line == 8 {
					tc.wantLine = 8 // the edited line parsed; the next names it
				} else {
					tc.wantMsg = "not a valid record"
				}
			}
			if p.Path != path || p.Line != tc.wantLine || !strings.Contains(p.Msg, tc.wantMsg) || (tc.wantRID != "" && p.RequestID != tc.wantRID) {
				t.Errorf("first problem = %v, want %s:%d %q (request_id %q)", p, path, tc.wantLine, tc.wantMsg, tc.wantRID)
			}
		})
	}
}

// TestForgedCheckpoint: a checkpoint signed by another key, or whose head or
// count was changed, is caught.
func TestForgedCheckpoint(t *testing.T) {
	s, mallory := newTestSigner(t), newTestSigner(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	writeLog(t, path, Options{Signer: s.signer(), CheckpointEvery: -1, CheckpointInterval: -1}, "r", 3)
	lines := readLines(t, path)
	last := len(lines) - 1
	ck, err := parseLine(bytes.TrimSuffix(lines[last], []byte("\n")))
	if err != nil || ck.Checkpoint == nil {
		t.Fatalf("last line = %v, %v; want the final checkpoint", ck, err)
	}
	resign := func(key crypto.Signer, certs []*x509.Certificate, r Record) []byte {
		c := *r.Checkpoint
		c.Certs = nil
		for _, cert := range certs {
			c.Certs = append(c.Certs, cert.Raw)
		}
		sig, err := signMessage(key, CheckpointMessage(r.Prev, c.Records, r.Time, c.Final, c.Signer))
		if err != nil {
			t.Fatal(err)
		}
		c.Sig = sig
		r.Checkpoint = &c
		return mustEncode(t, r)
	}
	for _, tc := range []struct {
		name  string
		line  []byte
		roots bool
		want  string
	}{
		{"another key, same certificate", func() []byte {
			r := ck
			c := *r.Checkpoint
			sig, _ := signMessage(mallory.key, CheckpointMessage(r.Prev, c.Records, r.Time, c.Final, c.Signer))
			c.Sig = sig
			r.Checkpoint = &c
			return mustEncode(t, r)
		}(), false, "signature does not verify"},
		{"another CA's certificate", resign(mallory.key, mallory.certs, ck), true, "does not verify against the CA bundle"},
		{"altered count", bytes.Replace(lines[last], []byte(`"records":3`), []byte(`"records":2`), 1), false, "signature does not verify"},
		{"altered head", func() []byte {
			r := ck
			r.Prev = strings.Repeat("ab", 32)
			c := *r.Checkpoint
			r.Checkpoint = &c
			return mustEncode(t, r)
		}(), false, "does not link to line"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "audit.log")
			writeLines(t, p, append(append([][]byte(nil), lines[:last]...), tc.line))
			var opts VerifyOptions
			if tc.roots {
				opts.Roots = s.roots()
			}
			rep := verify(t, opts, p)
			if rep.OK() {
				t.Fatalf("VerifyFiles(forged: %s) = OK, want a problem", tc.name)
			}
			var msgs []string
			for _, pr := range rep.Problems {
				msgs = append(msgs, pr.String())
			}
			if got := strings.Join(msgs, "\n"); rep.Problems[0].Line != last+1 || !strings.Contains(got, tc.want) {
				t.Errorf("problems = %s; want one at line %d saying %q", got, last+1, tc.want)
			}
		})
	}
}

// TestChainAcrossRestart: a server that restarts and appends to its log
// (after a clean close, or after a stop without a final checkpoint) links
// to the existing tail and counts from its last checkpoint.
func TestChainAcrossRestart(t *testing.T) {
	s := newTestSigner(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	signed := Options{Signer: s.signer(), CheckpointEvery: 4}
	writeLog(t, path, signed, "a", 3)
	writeLog(t, path, Options{}, "b", 2) // no signer: no final checkpoint, as after a crash
	writeLog(t, path, signed, "c", 5)    // 2 unsigned + 2 new, a checkpoint, 3 more, the final one
	rep := mustVerifyOK(t, VerifyOptions{Roots: s.roots()}, path)
	if rep.Records != 10 || rep.Checkpoints != 3 || !rep.Final {
		t.Errorf("VerifyFiles = %+v, want 10 records, 3 checkpoints, final", rep)
	}
	recs, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range recs {
		if r.Checkpoint != nil && !r.Checkpoint.Final && r.Checkpoint.Records != 4 {
			t.Errorf("checkpoint at line %d counts %d records, want 4 (2 before the restart, 2 after)", i+1, r.Checkpoint.Records)
		}
	}
}

// TestChainAcrossRotation: an operator renames the live file; the log
// reopens the path and the new file's first record links to the old file's
// last. Verified in order the files form one chain; a missing file is named.
func TestChainAcrossRotation(t *testing.T) {
	s := newTestSigner(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l, err := Open(path, Options{Signer: s.signer(), CheckpointInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for gen := range 3 {
		for i := range 3 {
			mustWrite(t, l, validRecord(fmt.Sprintf("g%d-%d", gen, i)))
		}
		if gen < 2 {
			rotated := fmt.Sprintf("%s.%d", path, gen)
			if err := os.Rename(path, rotated); err != nil {
				t.Fatal(err)
			}
			files = append(files, rotated)
			if err := l.Reopen(); err != nil {
				t.Fatal(err)
			}
			if err := l.Reopen(); err != nil { // nothing to do the second time
				t.Fatal(err)
			}
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	files = append(files, path)
	rep := mustVerifyOK(t, VerifyOptions{Roots: s.roots()}, files...)
	if rep.Records != 9 || rep.Files != 3 || !rep.Final {
		t.Errorf("VerifyFiles(%v) = %+v, want 9 records in 3 files, final", files, rep)
	}
	if rep := mustVerifyOK(t, VerifyOptions{}, files[1:]...); !strings.Contains(rep.Start, "continues from a record before this file") {
		t.Errorf("VerifyFiles(without the first file).Start = %q, want it to say the chain began earlier", rep.Start)
	}
	rep = verify(t, VerifyOptions{}, files[0], files[2])
	if rep.OK() || rep.Problems[0].Path != files[2] || rep.Problems[0].Line != 1 || !strings.Contains(rep.Problems[0].Msg, "a file between them is missing") {
		t.Errorf("VerifyFiles(a file left out) = %v, want a problem at %s:1", rep.Problems, files[2])
	}
}

// TestNewChainAfterRotationWhileDown: a log rotated while the server was
// down starts a new chain in the new file; that is accepted after a final
// checkpoint, and reported when the old file just stops.
func TestNewChainAfterRotationWhileDown(t *testing.T) {
	s := newTestSigner(t)
	for _, tc := range []struct {
		name   string
		opts   Options
		wantOK bool
	}{
		{"after a final checkpoint", Options{Signer: s.signer()}, true},
		{"without one", Options{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "audit.log")
			writeLog(t, path, tc.opts, "a", 2)
			if err := os.Rename(path, path+".1"); err != nil {
				t.Fatal(err)
			}
			writeLog(t, path, Options{Signer: s.signer()}, "b", 2)
			rep := verify(t, VerifyOptions{}, path+".1", path)
			if rep.OK() != tc.wantOK {
				t.Fatalf("VerifyFiles OK = %v (problems %v), want %v", rep.OK(), rep.Problems, tc.wantOK)
			}
			if tc.wantOK && len(rep.Restarts) != 1 {
				t.Errorf("Restarts = %q, want the new chain at %s:1", rep.Restarts, path)
			}
			if !tc.wantOK && (rep.Problems[0].Path != path || rep.Problems[0].Line != 1) {
				t.Errorf("first problem = %v, want %s:1", rep.Problems[0], path)
			}
		})
	}
}

// TestCheckpointInterval: a quiet log is checkpointed by time, and an idle
// one is not.
func TestCheckpointInterval(t *testing.T) {
	s := newTestSigner(t)
	var buf lockedBuffer
	l := NewWriter(&buf, Options{Signer: s.signer(), CheckpointEvery: -1, CheckpointInterval: 5 * time.Millisecond})
	mustWrite(t, l, validRecord("r"))
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(buf.String(), CheckpointOperation) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(30 * time.Millisecond) // idle: no more checkpoints
	if n := strings.Count(buf.String(), CheckpointOperation); n != 1 {
		t.Errorf("%d checkpoints after one record and an idle while, want 1:\n%s", n, buf.String())
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(buf.String(), `"final":true`); n != 1 {
		t.Errorf("%d final checkpoints after Close, want 1", n)
	}
}

// TestCheckpointSignerFailure: a checkpoint that cannot be signed fails its
// batch: nothing of it is written, the record's writer is refused, and the
// log recovers when the signer does.
func TestCheckpointSignerFailure(t *testing.T) {
	s := newTestSigner(t)
	fail := true
	signer := func() (crypto.Signer, []*x509.Certificate, error) {
		if fail {
			return nil, nil, errors.New("no key")
		}
		return s.key, s.certs, nil
	}
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{Signer: signer, CheckpointEvery: 1, CheckpointInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Write(context.Background(), validRecord("refused")); err == nil || !strings.Contains(err.Error(), "no key") {
		t.Errorf("Write with a failing signer = %v, want the signer's error", err)
	}
	fail = false
	mustWrite(t, l, validRecord("ok"))
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rep := mustVerifyOK(t, VerifyOptions{Roots: s.roots()}, path)
	if rep.Records != 1 || rep.Checkpoints != 2 {
		t.Errorf("VerifyFiles = %+v, want 1 record (the refused one absent), 2 checkpoints", rep)
	}
}

func TestWriteRefusesChainFields(t *testing.T) {
	l := NewWriter(&bytes.Buffer{}, Options{})
	r := validRecord("r")
	r.Prev = ChainStart
	if err := l.Write(context.Background(), r); !errors.Is(err, ErrInvalidRecord) {
		t.Errorf("Write(record with Prev) = %v, want ErrInvalidRecord", err)
	}
	r = validRecord("r")
	r.Checkpoint = &Checkpoint{}
	if err := l.Write(context.Background(), r); !errors.Is(err, ErrInvalidRecord) {
		t.Errorf("Write(record with Checkpoint) = %v, want ErrInvalidRecord", err)
	}
}

// lockedBuffer is a sink read while the timer writes to it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// seedLog is a small real log for the fuzz corpora.
func seedLog(f *testing.F) []byte {
	s := newTestSigner(f)
	var buf bytes.Buffer
	l := NewWriter(&buf, Options{Signer: s.signer(), CheckpointEvery: 2, CheckpointInterval: -1})
	for i := range 3 {
		if err := l.Write(context.Background(), validRecord(fmt.Sprintf("r-%d", i))); err != nil {
			f.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		f.Fatal(err)
	}
	return buf.Bytes()
}

// FuzzParseLine: the record parser never panics, and what it accepts
// re-encodes to a line it accepts again.
func FuzzParseLine(f *testing.F) {
	for l := range bytes.Lines(seedLog(f)) {
		f.Add(bytes.TrimSuffix(l, []byte("\n")))
	}
	f.Add([]byte(`{"time":"2026-01-01T00:00:00Z","prev":"x","identity":"","operation":"o","outcome":"ok"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := parseLine(line)
		if err != nil {
			return
		}
		enc, err := encode(r)
		if err != nil {
			t.Fatalf("encode(parseLine(%q)) = %v", line, err)
		}
		if _, err := parseLine(bytes.TrimSuffix(enc, []byte("\n"))); err != nil {
			t.Fatalf("parseLine(encode(parseLine(%q))) = %v", line, err)
		}
	})
}

// FuzzVerify: the verifier never panics on arbitrary bytes, and reports a
// problem for any change to an intact log that it does not accept.
func FuzzVerify(f *testing.F) {
	seed := seedLog(f)
	f.Add(seed, seed)
	f.Add([]byte("\n\n{}\n"), []byte("{"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		v := NewVerifier(VerifyOptions{})
		if err := v.Read("a", bytes.NewReader(a)); err != nil {
			t.Fatal(err)
		}
		if err := v.Read("b", bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		rep := v.Report()
		_ = rep.Summary()
		for _, p := range rep.Problems {
			_ = p.String()
		}
	})
}
