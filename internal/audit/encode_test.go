package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"time"
)

// jsonLine is the reference encoding: encoding/json with HTML escaping off,
// the time in UTC.
func jsonLine(t testing.TB, r Record) []byte {
	t.Helper()
	r.Time = r.Time.UTC()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		t.Fatalf("json.Encode(%+v) = %v", r, err)
	}
	return buf.Bytes()
}

func TestEncodeMatchesEncodingJSON(t *testing.T) {
	at := time.Date(2026, 11, 23, 3, 4, 5, 123456789, time.UTC)
	tricky := "q\"b\\s/ <html>&amp; \x00\x01\b\f\n\r\t\x1f\x7f é 😀 \u2028\u2029 \ufffd"
	for _, tc := range []struct {
		name string
		r    Record
	}{
		{"minimal", Record{Time: at, Operation: "op", Outcome: OutcomeOK}},
		{"whole-second time", Record{Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Operation: "op", Outcome: OutcomeOK}},
		{"other zone", Record{Time: at.In(time.FixedZone("x", -7*3600)), Operation: "op", Outcome: OutcomeOK}},
		{"every field", Record{Time: at, RequestID: "abc-1", Identity: "spiffe://cairn.test/client/us-east/app",
			Operation: "/cairn.kms.v1.KMS/Decrypt", Target: Target{Region: "us-east", Keyset: "payments/ledger", KeyVersion: 4294967295, Resource: "r"},
			Outcome: OutcomeError, Code: "InvalidArgument", Reason: "kms: ciphertext does not decrypt"}},
		{"key version only", Record{Time: at, Operation: "op", Outcome: OutcomeOK, Target: Target{KeyVersion: 7}}},
		{"resource only", Record{Time: at, Operation: "op", Outcome: OutcomeOK, Target: Target{Resource: "x"}}},
		{"keyset and resource", Record{Time: at, Operation: "op", Outcome: OutcomeOK, Target: Target{Keyset: "k", Resource: "x"}}},
		{"escapes in reason", Record{Time: at, Operation: "op", Outcome: OutcomeDenied, Reason: tricky}},
		{"escapes in fields", Record{Time: at, RequestID: `a"b`, Identity: `\`, Operation: "<op>&", Outcome: OutcomeOK,
			Target: Target{Region: "é", Keyset: "😀/\u2028", Resource: "\u2029"}, Code: "&"}},
		{"invalid utf-8", Record{Time: at, Operation: "op\xff\xfe", Outcome: OutcomeOK, Reason: "a\xc3(b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := encode(tc.r)
			if err != nil {
				t.Fatalf("encode = %v", err)
			}
			if want := jsonLine(t, tc.r); !bytes.Equal(got, want) {
				t.Errorf("encode =\n%s\nwant (encoding/json)\n%s", got, want)
			}
		})
	}
}

func TestEncodeRefusesUnrepresentableTime(t *testing.T) {
	for _, at := range []time.Time{time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)} {
		if _, err := encode(Record{Time: at, Operation: "op", Outcome: OutcomeOK}); !errors.Is(err, ErrInvalidRecord) {
			t.Errorf("encode(time %v) error = %v, want ErrInvalidRecord", at, err)
		}
		l := NewWriter(&bytes.Buffer{}, Options{})
		if err := l.Write(t.Context(), Record{Time: at, Operation: "op", Outcome: OutcomeOK}); !errors.Is(err, ErrInvalidRecord) {
			t.Errorf("Write(time %v) error = %v, want ErrInvalidRecord", at, err)
		}
		// The refused record left nothing behind: the next one is the
		// only line.
		var buf bytes.Buffer
		l = NewWriter(&buf, Options{})
		_ = l.Write(t.Context(), Record{Time: at, Operation: "op", Outcome: OutcomeOK})
		if err := l.Write(t.Context(), Record{Operation: "next", Outcome: OutcomeOK}); err != nil {
			t.Fatal(err)
		}
		if n := bytes.Count(buf.Bytes(), []byte("\n")); n != 1 || !bytes.Contains(buf.Bytes(), []byte(`"operation":"next"`)) {
			t.Errorf("after a refused record the log holds %q, want only the next record", buf.Bytes())
		}
	}
}

// FuzzEncode holds the hand-written encoder to encoding/json's bytes for any
// field values.
func FuzzEncode(f *testing.F) {
	f.Add("rid", "spiffe://cairn.test/a/b/c", "/svc/M", "us-east", "k/v", uint32(3), "res", "Code", "reason \x00\u2028", int64(1_700_000_000_123_456_789))
	f.Add("", "", "", "", "", uint32(0), "", "", "", int64(0))
	f.Fuzz(func(t *testing.T, rid, id, op, region, ks string, kv uint32, res, code, reason string, ns int64) {
		r := Record{Time: time.Unix(0, ns), RequestID: rid, Identity: id, Operation: op,
			Target: Target{Region: region, Keyset: ks, KeyVersion: kv, Resource: res}, Outcome: Outcome(code + "x"), Code: code, Reason: reason}
		got, err := encode(r)
		if err != nil {
			t.Fatalf("encode = %v", err)
		}
		if want := jsonLine(t, r); !bytes.Equal(got, want) {
			t.Errorf("encode =\n%q\nwant (encoding/json)\n%q", got, want)
		}
	})
}

func BenchmarkEncode(b *testing.B) {
	r := Record{Time: time.Now(), RequestID: "0123456789abcdef-1f", Identity: "spiffe://cairn.test/client/us-east/app",
		Operation: "/cairn.kms.v1.KMS/Decrypt", Target: Target{Keyset: "payments/ledger", KeyVersion: 1234567}, Outcome: OutcomeOK}
	b.Run("hand-written", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := encode(r); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			jsonLine(b, r)
		}
	})
}
