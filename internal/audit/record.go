// Package audit writes Cairn's append-only audit log.
//
// An audit record says who did what to which key, and with what outcome. It
// never holds key material. The audit log is kept apart from the operational
// log/slog stream, and it fails closed: if a record cannot be written, the
// operation it describes must be refused. So [Log.Write] reports every
// failure, and a log that may have lost or mangled a record stops accepting
// writes ([ErrBroken]) until it is reopened.
//
// The log is a file of JSON lines, one [Record] per line. [ReadFile] parses
// such a file.
//
// # Tamper evidence
//
// Each record's "prev" field is the lowercase hex SHA-256 of the previous
// line's exact bytes, its '\n' included: the records form a hash chain, so a
// record deleted, moved or changed breaks the link of the record after it.
// The first record of a chain (a log opened on an empty file) has
// [ChainStart], 64 zeros. A log opened on an existing file links to its last
// line, so a restart continues the chain; [Log.Reopen] (and, for a log that
// signs checkpoints, its timer) follows an operator's rename of the file and
// links the new file's first record to the old file's last. Records written
// before the chain existed have no "prev" and still parse.
//
// A checkpoint record (operation [CheckpointOperation], field "checkpoint")
// is the server signing the chain: its "prev" is the chain head, and
// [Checkpoint] holds the count of records since the previous checkpoint,
// whether it is the final one (written by [Log.Close]), the signer's SPIFFE
// ID, its certificate chain (DER, base64) and the signature over
// [CheckpointMessage]. Options.Signer (the server's X.509-SVID, see
// [SVIDSigner]) turns them on; Options.CheckpointEvery and
// Options.CheckpointInterval set how often. Records after the last
// checkpoint can be cut from the end without a trace until the next one.
//
// [Verifier] (and `cairn audit verify`) checks files in order as one chain:
// every link, every checkpoint's signature, count and (given the trust
// bundle) certificate, and reports the first broken spot by file and line.
// A new chain in a later file is accepted only right after a final
// checkpoint (a clean shutdown, then a rotation while the server was down).
package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Outcome is what came of an audited operation.
type Outcome string

// The outcomes a [Record] may have.
const (
	// OutcomeAttempt is written before a mutating operation runs. If it
	// cannot be written, the operation must not run.
	OutcomeAttempt Outcome = "attempt"
	// OutcomeOK means the operation succeeded.
	OutcomeOK Outcome = "ok"
	// OutcomeDenied means the caller was not allowed to perform the
	// operation.
	OutcomeDenied Outcome = "denied"
	// OutcomeError means the operation was allowed but failed.
	OutcomeError Outcome = "error"
)

func (o Outcome) valid() bool {
	switch o {
	case OutcomeAttempt, OutcomeOK, OutcomeDenied, OutcomeError:
		return true
	}
	return false
}

// Limits on the text fields of a [Record].
const (
	// MaxFieldLen is the longest RequestID, Identity, Operation, Code or
	// Target field accepted, in bytes. SPIFFE IDs are at most 2048 bytes.
	MaxFieldLen = 2048
	// MaxReasonLen is the longest Reason kept, in bytes. [Log.Write] cuts a
	// longer Reason at a rune boundary at or below this length.
	MaxReasonLen = 512
)

// Target names what an operation acted on. Empty fields are left out of the
// JSON form.
type Target struct {
	Region     string `json:"region,omitempty"`
	Keyset     string `json:"keyset,omitempty"`
	KeyVersion uint32 `json:"key_version,omitempty"`
	Resource   string `json:"resource,omitempty"`
}

// Record is one entry of the audit log. It must never hold key material.
//
// [Log.Write] accepts a record only if Operation is set, Outcome is one of the
// Outcome constants, and RequestID, Identity, Operation, Code and the Target
// fields are valid UTF-8 of at most [MaxFieldLen] bytes without control
// characters. Values that may come from a caller, such as a request ID taken
// from request metadata, must be sanitised before they are put in a record,
// or the write, and so the operation, is refused. Reason is free text: it is
// made valid UTF-8 and cut to [MaxReasonLen] bytes, and JSON escapes any
// control characters in it.
type Record struct {
	// Time is when the event happened. Log.Write sets it from the log's clock
	// when it is zero, and stores it in UTC.
	Time time.Time `json:"time"`
	// Prev chains the record to the one before it: the lowercase hex
	// SHA-256 of the previous line of the log, its '\n' included, or
	// [ChainStart] (64 zeros) for the first record of a chain. [Log.Write]
	// sets it (a record given to Write must leave it empty). Records written
	// before the chain existed have none.
	Prev string `json:"prev,omitempty"`
	// RequestID correlates the record with the request and its other
	// records, such as an OutcomeAttempt record and the final one.
	RequestID string `json:"request_id,omitempty"`
	// Identity is the caller's authenticated SPIFFE ID, for example
	// "spiffe://cairn.test/kms/us-east/kms1", or "" if the caller was not
	// authenticated. It is always present in the JSON form.
	Identity string `json:"identity"`
	// Operation is the full gRPC method name or another operation name, for
	// example "cairn.kms.v1.KMS/Encrypt". Required.
	Operation string `json:"operation"`
	// Target is what the operation acted on.
	Target Target `json:"target,omitzero"`
	// Outcome is what came of the operation. Required.
	Outcome Outcome `json:"outcome"`
	// Code is the gRPC status code name when the outcome is not OK, for
	// example "PermissionDenied".
	Code string `json:"code,omitempty"`
	// Reason is a short human-readable explanation.
	Reason string `json:"reason,omitempty"`
	// Checkpoint is set only on a checkpoint record (Operation
	// [CheckpointOperation]), which the log writes itself.
	Checkpoint *Checkpoint `json:"checkpoint,omitempty"`
}

// ChainStart is the Prev of the first record of a chain: a log file opened
// empty, with no record before it to link to.
const ChainStart = "0000000000000000000000000000000000000000000000000000000000000000"

// CheckpointOperation is the Operation of a checkpoint record.
const CheckpointOperation = "audit.checkpoint"

// Checkpoint is a signed statement by the server that wrote the log: "the
// chain, up to the record whose hash is this record's Prev, holds Records
// more records since the previous checkpoint (or the chain's start), at this
// record's Time". The record's Identity is Signer.
type Checkpoint struct {
	// Records is the number of records (checkpoints not counted) between
	// the previous checkpoint of the chain, or its start, and this one.
	Records uint64 `json:"records"`
	// Final marks the checkpoint written when the log was closed: nothing
	// follows it in this chain. A new chain may start after it.
	Final bool `json:"final,omitempty"`
	// Signer is the SPIFFE ID of the signing certificate (Certs[0]).
	Signer string `json:"signer"`
	// Certs is the signer's certificate chain, DER, leaf first.
	Certs [][]byte `json:"certs"`
	// Sig is the signature, by Certs[0]'s key, of [CheckpointMessage] for
	// this record.
	Sig []byte `json:"sig"`
}

// CheckpointMessage returns the bytes a checkpoint's signature covers: a
// version line, then the chain head (the checkpoint record's Prev), the
// record count, the time (RFC 3339, nanoseconds, UTC), "final" or "open",
// and the signer's ID, one per line. An ECDSA or RSA signer signs its
// SHA-256; an Ed25519 signer signs it whole.
func CheckpointMessage(prev string, records uint64, t time.Time, final bool, signer string) []byte {
	b := make([]byte, 0, 192)
	b = append(b, "cairn audit checkpoint v1\n"...)
	b = append(b, prev...)
	b = append(b, '\n')
	b = strconv.AppendUint(b, records, 10)
	b = append(b, '\n')
	b = t.UTC().AppendFormat(b, time.RFC3339Nano)
	if final {
		b = append(b, "\nfinal\n"...)
	} else {
		b = append(b, "\nopen\n"...)
	}
	return append(b, signer...)
}

// ErrInvalidRecord is returned, wrapped, for a record that breaks the rules
// documented on [Record]. Nothing is written for it.
var ErrInvalidRecord = errors.New("audit: invalid record")

// validate checks r against the rules documented on Record.
func (r Record) validate() error {
	if r.Operation == "" {
		return fmt.Errorf("%w: operation is required", ErrInvalidRecord)
	}
	if r.Outcome == "" {
		return fmt.Errorf("%w: outcome is required", ErrInvalidRecord)
	}
	if !r.Outcome.valid() {
		return fmt.Errorf("%w: unknown outcome %q", ErrInvalidRecord, r.Outcome)
	}
	for _, f := range [...]struct{ name, value string }{
		{"request_id", r.RequestID},
		{"identity", r.Identity},
		{"operation", r.Operation},
		{"code", r.Code},
		{"target.region", r.Target.Region},
		{"target.keyset", r.Target.Keyset},
		{"target.resource", r.Target.Resource},
	} {
		switch {
		case len(f.value) > MaxFieldLen:
			return fmt.Errorf("%w: %s is %d bytes, want at most %d", ErrInvalidRecord, f.name, len(f.value), MaxFieldLen)
		case !utf8.ValidString(f.value):
			return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalidRecord, f.name)
		case strings.ContainsFunc(f.value, unicode.IsControl):
			return fmt.Errorf("%w: %s contains a control character", ErrInvalidRecord, f.name)
		}
	}
	if r.Prev != "" && !validHash(r.Prev) {
		return fmt.Errorf("%w: prev is not 64 lowercase hex digits", ErrInvalidRecord)
	}
	if c := r.Checkpoint; c != nil {
		switch {
		case r.Operation != CheckpointOperation:
			return fmt.Errorf("%w: a checkpoint in a record of operation %q", ErrInvalidRecord, r.Operation)
		case len(c.Certs) == 0 || len(c.Sig) == 0:
			return fmt.Errorf("%w: checkpoint without certificate or signature", ErrInvalidRecord)
		case c.Signer != r.Identity:
			return fmt.Errorf("%w: checkpoint signer %q is not the record's identity %q", ErrInvalidRecord, c.Signer, r.Identity)
		}
	} else if r.Operation == CheckpointOperation {
		return fmt.Errorf("%w: a %s record without a checkpoint", ErrInvalidRecord, CheckpointOperation)
	}
	if len(r.Reason) > MaxReasonLen {
		return fmt.Errorf("%w: reason is %d bytes, want at most %d", ErrInvalidRecord, len(r.Reason), MaxReasonLen)
	}
	if !utf8.ValidString(r.Reason) {
		return fmt.Errorf("%w: reason is not valid UTF-8", ErrInvalidRecord)
	}
	return nil
}

// validHash reports whether s is 64 lowercase hex digits.
func validHash(s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// capReason makes s valid UTF-8 and cuts it to at most MaxReasonLen bytes at
// a rune boundary.
func capReason(s string) string {
	s = strings.ToValidUTF8(s, string(utf8.RuneError))
	if len(s) <= MaxReasonLen {
		return s
	}
	i := MaxReasonLen
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i]
}

// encode returns r as one JSON line ending in '\n': the bytes encoding/json
// (with HTML escaping off) would write for it. JSON escapes every control
// character, so the only newline is the last byte.
func encode(r Record) ([]byte, error) {
	line, err := appendHead(nil, r.Time)
	if err != nil {
		return nil, err
	}
	if r.Prev != "" {
		line = appendField(line, `,"prev":`, r.Prev)
	}
	return appendTail(line, &r), nil
}

// appendHead appends the start of a record's line up to and including its
// time: {"time":"<RFC 3339 in UTC, nanoseconds>". It refuses a time encoding/json
// cannot represent (a year outside 0-9999).
func appendHead(dst []byte, t time.Time) ([]byte, error) {
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		return dst, fmt.Errorf("%w: time %v: year outside [0,9999]", ErrInvalidRecord, t)
	}
	dst = append(dst, `{"time":"`...)
	dst = t.AppendFormat(dst, time.RFC3339Nano)
	return append(dst, '"'), nil
}

// appendTail appends the rest of r's line after its time: the other fields
// in the order, and with the omissions, of the struct tags, then "}\n".
//
// It is hand-written because it runs on every audited call of the data path,
// where encoding/json's reflection and buffer cost more than the rest of the
// audit write; TestEncodeMatchesEncodingJSON and FuzzEncode hold it to
// encoding/json's bytes.
func appendTail(dst []byte, r *Record) []byte {
	if r.RequestID != "" {
		dst = appendField(dst, `,"request_id":`, r.RequestID)
	}
	dst = appendField(dst, `,"identity":`, r.Identity)
	dst = appendField(dst, `,"operation":`, r.Operation)
	if r.Target != (Target{}) {
		dst = append(dst, `,"target":{`...)
		sep := false
		field := func(name, v string) {
			if v == "" {
				return
			}
			if sep {
				dst = append(dst, ',')
			}
			dst = appendField(dst, name, v)
			sep = true
		}
		field(`"region":`, r.Target.Region)
		field(`"keyset":`, r.Target.Keyset)
		if r.Target.KeyVersion != 0 {
			if sep {
				dst = append(dst, ',')
			}
			dst = append(dst, `"key_version":`...)
			dst = strconv.AppendUint(dst, uint64(r.Target.KeyVersion), 10)
			sep = true
		}
		field(`"resource":`, r.Target.Resource)
		dst = append(dst, '}')
	}
	dst = appendField(dst, `,"outcome":`, string(r.Outcome))
	if r.Code != "" {
		dst = appendField(dst, `,"code":`, r.Code)
	}
	if r.Reason != "" {
		dst = appendField(dst, `,"reason":`, r.Reason)
	}
	if c := r.Checkpoint; c != nil {
		dst = append(dst, `,"checkpoint":{"records":`...)
		dst = strconv.AppendUint(dst, c.Records, 10)
		if c.Final {
			dst = append(dst, `,"final":true`...)
		}
		dst = appendField(dst, `,"signer":`, c.Signer)
		dst = append(dst, `,"certs":`...)
		if c.Certs == nil {
			dst = append(dst, "null"...)
		} else {
			dst = append(dst, '[')
			for i, der := range c.Certs {
				if i > 0 {
					dst = append(dst, ',')
				}
				dst = appendBytes(dst, der)
			}
			dst = append(dst, ']')
		}
		dst = append(dst, `,"sig":`...)
		dst = appendBytes(dst, c.Sig)
		dst = append(dst, '}')
	}
	return append(dst, '}', '\n')
}

// appendBytes appends b as encoding/json does: standard base64 in quotes,
// or null for nil.
func appendBytes(dst, b []byte) []byte {
	if b == nil {
		return append(dst, "null"...)
	}
	dst = append(dst, '"')
	dst = base64.StdEncoding.AppendEncode(dst, b)
	return append(dst, '"')
}

func appendField(dst []byte, name, v string) []byte {
	return appendString(append(dst, name...), v)
}

// appendString appends s as a JSON string exactly as encoding/json does with
// HTML escaping off: '"', '\\' and control characters escaped (\b \f \n \r
// \t short, the rest as \u00XX), invalid UTF-8 as \ufffd, and U+2028 and
// U+2029 as \u2028 and \u2029.
func appendString(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		if b := s[i]; b < utf8.RuneSelf {
			if b >= 0x20 && b != '"' && b != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch b {
			case '"', '\\':
				dst = append(dst, '\\', b)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[b>>4], hex[b&0xF])
			}
			i++
			start = i
			continue
		}
		c, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case c == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case c == '\u2028' || c == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[c&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// ErrMalformed is returned, wrapped in a [*ParseError], by [ReadFile] for a
// line that is not a valid record.
var ErrMalformed = errors.New("audit: malformed record")

// ParseError reports a malformed line of an audit log file.
type ParseError struct {
	Path string // the file
	Line int    // 1-based line number
	Err  error  // what is wrong; wraps ErrMalformed
}

// Error returns "path:line: reason".
func (e *ParseError) Error() string {
	return fmt.Sprintf("%s:%d: %v", e.Path, e.Line, e.Err)
}

// Unwrap returns e.Err, so errors.Is(err, ErrMalformed) holds.
func (e *ParseError) Unwrap() error { return e.Err }

// parseLine parses one line (without its '\n') strictly: exactly one JSON
// object, no unknown fields, a time, and a record that passes validate.
func parseLine(line []byte) (Record, error) {
	var r Record
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Record{}, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if err := dec.Decode(&struct{}{}); err != io.EOF {
		return Record{}, fmt.Errorf("%w: data after the record", ErrMalformed)
	}
	if r.Time.IsZero() {
		return Record{}, fmt.Errorf("%w: time is missing", ErrMalformed)
	}
	if err := r.validate(); err != nil {
		return Record{}, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return r, nil
}
