package kms

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/kms/keystore"
)

func TestUsageFileRoundTrip(t *testing.T) {
	at := time.Date(2026, 11, 23, 4, 5, 6, 7_000_000, time.UTC)
	want := keystore.History{
		Usage: []keystore.UsageRecord{
			{Keyset: "payments/ledger", KeyID: 4294967295, Decrypting: true, TTL: 365 * 24 * time.Hour, Window: time.Minute,
				EncryptCount: 1 << 40, DecryptCount: 3, LastUse: at, LastEncrypt: at.Add(-time.Second), HistoryLost: true},
			{Keyset: "a/b.c_d-e", KeyID: 1, TTL: time.Nanosecond},
		},
		TTL: map[string][]safety.TTLPeriod{
			"payments/ledger": {{TTL: 90 * 24 * time.Hour, From: at.Add(-time.Hour), Until: at}, {TTL: time.Second, From: at}},
			"a/b":             {{TTL: time.Hour, From: at}},
		},
	}
	got, err := decodeUsage(encodeUsage(want.Usage, want.TTL))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
	if got, err := decodeUsage(encodeUsage(nil, nil)); err != nil || len(got.Usage) != 0 || len(got.TTL) != 0 {
		t.Errorf("decode(no records) = %v, %v", got, err)
	}
}

// TestUsageFileVersion1Loads: a file written before version 2 (no last
// encrypt, window, history-lost flag or TTL history) still loads, through
// readUsageFile's checks.
func TestUsageFileVersion1Loads(t *testing.T) {
	dir := t.TempDir()
	v1 := "cairn-kms-usage 1\npayments/ledger\t7\t1\t86400000000000\t2\t3\t1790000000000000000\na/b\t8\t0\t3600000000000\t0\t1\t0\n"
	if err := os.WriteFile(filepath.Join(dir, UsageFile), []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := readUsageFile(dir, time.Unix(1_800_000_000, 0))
	if err != nil {
		t.Fatalf("readUsageFile(version 1) = %v", err)
	}
	want := keystore.History{Usage: []keystore.UsageRecord{
		{Keyset: "payments/ledger", KeyID: 7, Decrypting: true, TTL: 24 * time.Hour, EncryptCount: 2, DecryptCount: 3, LastUse: time.Unix(0, 1790000000000000000).UTC()},
		{Keyset: "a/b", KeyID: 8, TTL: time.Hour, DecryptCount: 1},
	}}
	if diff := cmp.Diff(want, got, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("readUsageFile(version 1) mismatch (-want +got):\n%s", diff)
	}
}

func TestUsageFileRefusesMalformed(t *testing.T) {
	for _, in := range []string{
		"",
		"cairn-kms-usage 3\n",
		"cairn-kms-usage 1\na/b\t1\t1\t1\t0\t0\t5",            // no final newline
		"cairn-kms-usage 1\na/b\t1\t1\t1\t0\t0\n",             // 6 fields
		"cairn-kms-usage 1\na/b\t1\t2\t1\t0\t0\t5\n",          // decrypting not 0/1
		"cairn-kms-usage 1\na/b\t-1\t1\t1\t0\t0\t5\n",         // negative key id
		"cairn-kms-usage 1\na/b\t4294967296\t1\t1\t0\t0\t5\n", // key id over 32 bits
		"cairn-kms-usage 1\na/b\t1\t1\tx\t0\t0\t5\n",
		"cairn-kms-usage 1\nu\ta/b\t1\t1\t1\t0\t0\t5\t5\t0\t0\n", // a version 2 line in version 1
		"cairn-kms-usage 2\na/b\t1\t1\t1\t0\t0\t5\n",             // a version 1 line in version 2
		"cairn-kms-usage 2\nu\ta/b\t1\t1\t1\t0\t0\t5\t5\t0\n",    // 9 fields
		"cairn-kms-usage 2\nu\ta/b\t1\t1\t1\t0\t0\t5\t5\t0\t2\n", // history lost not 0/1
		"cairn-kms-usage 2\nu\ta/b\t1\t1\t1\t0\t0\t5\tx\t0\t0\n",
		"cairn-kms-usage 2\nt\ta/b\t1\t5\n",       // 3 fields
		"cairn-kms-usage 2\nt\ta/b\t1\t5\tx\n",    // bad until
		"cairn-kms-usage 2\nx\ta/b\t1\t5\t0\n",    // unknown kind
		"cairn-kms-usage 2\n\n",                   // empty line
		"cairn-kms-usage 2\nt\ta/b\t1\t5\t0\t0\n", // 5 fields after t
	} {
		if got, err := decodeUsage([]byte(in)); err == nil {
			t.Errorf("decodeUsage(%q) = %v, nil; want an error", in, got)
		}
	}
}

func TestUsageFileRefusesImplausible(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, tt := range []struct{ name, body, want string }{
		{"negative window", "u\ta/b\t1\t1\t1\t0\t0\t5\t5\t-1\t0\n", "negative TTL or window"},
		{"last encrypt after last use", "u\ta/b\t1\t1\t1\t0\t0\t5\t6\t0\t0\n", "after its last use"},
		{"zero TTL period", "t\ta/b\t0\t5\t0\n", "not positive"},
		{"period from nothing", "t\ta/b\t1\t0\t0\n", "starts at no time"},
		{"open period not last", "t\ta/b\t1\t5\t0\nt\ta/b\t1\t6\t0\n", "open but not the last"},
		{"period ends before it starts", "t\ta/b\t1\t5\t4\nt\ta/b\t1\t6\t0\n", "ends before it starts"},
		{"overlapping periods", "t\ta/b\t1\t5\t9\nt\ta/b\t1\t6\t0\n", "overlaps"},
		{"invalid keyset name", "t\tA B\t1\t5\t0\n", "no valid keyset"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, UsageFile), []byte(usageHeader+tt.body), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := readUsageFile(dir, now); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("readUsageFile(%q) = %v, want an error containing %q", tt.body, err, tt.want)
			}
		})
	}
}

func FuzzDecodeUsage(f *testing.F) {
	f.Add([]byte(usageHeaderV1 + "payments/ledger\t1\t1\t3600000000000\t2\t3\t1700000000000000000\n"))
	f.Add([]byte(usageHeader + "u\tpayments/ledger\t1\t1\t3600000000000\t2\t3\t1700000000000000000\t1600000000000000000\t60000000000\t1\n" +
		"t\tpayments/ledger\t3600000000000\t1600000000000000000\t0\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := decodeUsage(data)
		if err != nil {
			return
		}
		// What decodes re-encodes to what decodes the same.
		again, err := decodeUsage(encodeUsage(h.Usage, h.TTL))
		if err != nil || !cmp.Equal(h, again, cmpopts.EquateEmpty()) {
			t.Errorf("re-decoding %q gave %v, %v", strings.TrimSpace(string(encodeUsage(h.Usage, h.TTL))), again, err)
		}
	})
}
