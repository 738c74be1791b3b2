package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// VerifyOptions configures a [Verifier].
type VerifyOptions struct {
	// Roots are the trust bundle's CA certificates. A checkpoint's
	// certificate chain must then verify against them (at the checkpoint's
	// time). Nil: each signature is checked against the certificate the
	// checkpoint carries only.
	Roots []*x509.Certificate
}

// Problem is one thing wrong with a log: where it is and what.
type Problem struct {
	Path      string
	Line      int       // 1-based
	RequestID string    // of the record at Line, if it parsed
	Time      time.Time // of the record at Line, if it parsed
	Msg       string
}

// String returns "path:line: msg (request_id ..., time ...)".
func (p Problem) String() string {
	s := fmt.Sprintf("%s:%d: %s", p.Path, p.Line, p.Msg)
	if p.RequestID != "" || !p.Time.IsZero() {
		s += fmt.Sprintf(" (request_id %q, time %s)", p.RequestID, p.Time.Format(time.RFC3339Nano))
	}
	return s
}

// Report is what a [Verifier] found.
type Report struct {
	Files       int
	Records     int // records, checkpoints not counted
	Checkpoints int
	// Unchained counts records without a chain link (written before the
	// chain existed).
	Unchained int
	// Unsigned counts the records after the last checkpoint: nothing signs
	// them yet (a live log), and they could be cut without a trace.
	Unsigned    int
	First, Last time.Time
	// Start says where the chain starts; Restarts lists new chains begun
	// after a final checkpoint (a clean shutdown).
	Start    string
	Restarts []string
	// Final reports that the last record is a final checkpoint.
	Final    bool
	Problems []Problem
}

// OK reports whether no problem was found.
func (r *Report) OK() bool { return len(r.Problems) == 0 }

// maxProblems bounds a report: the first problem is the one that matters.
const maxProblems = 100

// Verifier checks one or more audit log files, in order, as one chain: each
// record must link to the line before it (across files: the last line of
// the previous file), each checkpoint's signature must verify and its
// record count match. Feed it files with Read, then take the Report.
type Verifier struct {
	opts VerifyOptions
	rep  Report

	path        string
	line        int
	havePrev    bool
	prevHash    [sha256.Size]byte
	prevPath    string
	prevLine    int
	prevChained bool
	prevFinal   bool
	since       uint64 // records since the last checkpoint or chain start
	countKnown  bool   // since counts from a checkpoint or chain start
	unsigned    bool   // the records since the last checkpoint are unsigned
}

// NewVerifier returns a Verifier.
func NewVerifier(opts VerifyOptions) *Verifier { return &Verifier{opts: opts} }

// VerifyFiles verifies the files at paths, in order, as one chain. The
// error is only for a file that cannot be read.
func VerifyFiles(paths []string, opts VerifyOptions) (*Report, error) {
	v := NewVerifier(opts)
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("audit: %w", err)
		}
		err = v.Read(p, f)
		_ = f.Close() // read-only
		if err != nil {
			return nil, err
		}
	}
	return v.Report(), nil
}

// Read verifies the next file of the chain, named path in problems. The
// error is only for a failed read; what is wrong with the content goes in
// the report.
func (v *Verifier) Read(path string, r io.Reader) error {
	v.rep.Files++
	v.path, v.line = path, 0
	br := bufio.NewReader(r)
	for {
		raw, err := br.ReadBytes('\n')
		if len(raw) > 0 {
			v.line++
			v.check(raw)
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("audit: read %s: %w", path, err)
		}
	}
}

// Report returns what was found so far.
func (v *Verifier) Report() *Report {
	rep := v.rep
	rep.Final = v.prevFinal
	if v.unsigned {
		rep.Unsigned = int(v.since)
	}
	rep.Problems = append([]Problem(nil), v.rep.Problems...)
	rep.Restarts = append([]string(nil), v.rep.Restarts...)
	return &rep
}

func (v *Verifier) problem(r *Record, format string, args ...any) {
	if len(v.rep.Problems) >= maxProblems {
		return
	}
	p := Problem{Path: v.path, Line: v.line, Msg: fmt.Sprintf(format, args...)}
	if r != nil {
		p.RequestID, p.Time = r.RequestID, r.Time
	}
	v.rep.Problems = append(v.rep.Problems, p)
}

// check verifies one line (with its '\n', unless it is a torn last line).
func (v *Verifier) check(raw []byte) {
	h := sha256.Sum256(raw)
	defer func() {
		v.havePrev, v.prevHash, v.prevPath, v.prevLine = true, h, v.path, v.line
	}()
	if raw[len(raw)-1] != '\n' {
		v.problem(nil, "incomplete last line (a torn write, or the file was cut in the middle of a record)")
		v.prevChained, v.prevFinal = true, false
		return
	}
	r, err := parseLine(raw[:len(raw)-1])
	if err != nil {
		v.problem(nil, "not a valid record (changed?): %v", err)
		v.prevChained, v.prevFinal = true, false
		return
	}
	if r.Checkpoint != nil {
		v.rep.Checkpoints++
	} else {
		v.rep.Records++
		if v.rep.First.IsZero() {
			v.rep.First = r.Time
		}
		v.rep.Last = r.Time
	}
	here := func() string { return fmt.Sprintf("%s:%d", v.path, v.line) } // only for the rare chain starts
	switch {
	case r.Prev == "":
		v.rep.Unchained++
		if v.havePrev && v.prevChained {
			v.problem(&r, "record without a chain link after chained records (inserted, or written by a server that does not chain)")
		}
	case r.Prev == ChainStart:
		switch {
		case !v.havePrev || !v.prevChained:
			if v.rep.Start == "" {
				v.rep.Start = here() + ": a new chain starts"
			}
		case v.prevFinal:
			v.rep.Restarts = append(v.rep.Restarts, fmt.Sprintf("%s: a new chain after the final checkpoint at %s:%d", here(), v.prevPath, v.prevLine))
		default:
			v.problem(&r, "a new chain starts, but %s:%d before it is not a final checkpoint: records after it may be missing (or the server crashed and restarted on a new, empty file)", v.prevPath, v.prevLine)
		}
		v.since, v.countKnown, v.unsigned = 0, true, true
	default:
		var want [2 * sha256.Size]byte
		hex.Encode(want[:], v.prevHash[:])
		switch {
		case !v.havePrev:
			v.rep.Start = here() + ": the chain continues from a record before this file (not given)"
		case r.Prev == string(want[:]):
		case v.line == 1:
			v.problem(&r, "does not link to the last record of %s (line %d): a file between them is missing, or the end of %s was cut or changed", v.prevPath, v.prevLine, v.prevPath)
		default:
			v.problem(&r, "does not link to line %d before it: that record was changed, or records between them were deleted or moved", v.prevLine)
		}
	}
	v.prevChained = r.Prev != ""
	v.prevFinal = false
	if c := r.Checkpoint; c != nil {
		v.checkCheckpoint(&r)
		if v.countKnown && c.Records != v.since {
			v.problem(&r, "checkpoint counts %d records since the previous checkpoint, the log holds %d: records were removed or added", c.Records, v.since)
		}
		v.since, v.countKnown, v.unsigned, v.prevFinal = 0, true, false, c.Final
		return
	}
	v.since++
	v.unsigned = true
}

// checkCheckpoint verifies a checkpoint's signature, and its certificate
// against the roots if there are any.
func (v *Verifier) checkCheckpoint(r *Record) {
	c := r.Checkpoint
	certs := make([]*x509.Certificate, 0, len(c.Certs))
	for i, der := range c.Certs {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			v.problem(r, "checkpoint certificate %d does not parse: %v", i, err)
			return
		}
		certs = append(certs, cert)
	}
	id, err := spiffeIDOf(certs[0])
	if err != nil {
		v.problem(r, "checkpoint: %v", err)
		return
	}
	if id != c.Signer {
		v.problem(r, "checkpoint signer %q is not its certificate's ID %q", c.Signer, id)
		return
	}
	if err := verifySignature(certs[0].PublicKey, CheckpointMessage(r.Prev, c.Records, r.Time, c.Final, c.Signer), c.Sig); err != nil {
		v.problem(r, "checkpoint signature does not verify (forged, or the checkpoint was changed): %v", err)
		return
	}
	if v.opts.Roots == nil {
		return
	}
	sid, err := spiffeid.FromString(c.Signer)
	if err != nil {
		v.problem(r, "checkpoint signer %q: %v", c.Signer, err)
		return
	}
	bundle := x509bundle.FromX509Authorities(sid.TrustDomain(), v.opts.Roots)
	if _, _, err := x509svid.Verify(certs, bundle, x509svid.WithTime(r.Time)); err != nil {
		v.problem(r, "checkpoint certificate of %s does not verify against the CA bundle: %v", c.Signer, err)
	}
}

// Summary is the one-line summary of an intact log.
func (r *Report) Summary() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "intact: %d files, %d records, %d checkpoints", r.Files, r.Records, r.Checkpoints)
	if !r.First.IsZero() {
		fmt.Fprintf(&b, ", %s to %s", r.First.Format(time.RFC3339Nano), r.Last.Format(time.RFC3339Nano))
	}
	if r.Start != "" {
		fmt.Fprintf(&b, "; chain: %s", r.Start)
	}
	for _, s := range r.Restarts {
		fmt.Fprintf(&b, "; %s", s)
	}
	if r.Unchained > 0 {
		fmt.Fprintf(&b, "; %d records from before the chain (unchained)", r.Unchained)
	}
	switch {
	case r.Final:
	case r.Unsigned > 0:
		fmt.Fprintf(&b, "; the last %d records are not covered by a checkpoint yet", r.Unsigned)
	}
	if r.Final {
		b.WriteString("; ends with a final checkpoint")
	}
	return b.String()
}
