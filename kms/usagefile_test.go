package kms

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/kms/keystore"
)

func TestUsageFileRoundTrip(t *testing.T) {
	at := time.Date(2026, 11, 23, 4, 5, 6, 7_000_000, time.UTC)
	records := []keystore.UsageRecord{
		{Keyset: "payments/ledger", KeyID: 4294967295, Decrypting: true, TTL: 365 * 24 * time.Hour, EncryptCount: 1 << 40, DecryptCount: 3, LastUse: at},
		{Keyset: "a/b.c_d-e", KeyID: 1, TTL: time.Nanosecond},
	}
	got, err := decodeUsage(encodeUsage(records))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(records, got); diff != "" {
		t.Errorf("round trip mismatch (-want +got):\n%s", diff)
	}
	if got, err := decodeUsage(encodeUsage(nil)); err != nil || len(got) != 0 {
		t.Errorf("decode(no records) = %v, %v", got, err)
	}
}

func TestUsageFileRefusesMalformed(t *testing.T) {
	for _, in := range []string{
		"",
		"cairn-kms-usage 2\n",
		"cairn-kms-usage 1\na/b\t1\t1\t1\t0\t0\t5",            // no final newline
		"cairn-kms-usage 1\na/b\t1\t1\t1\t0\t0\n",             // 6 fields
		"cairn-kms-usage 1\na/b\t1\t2\t1\t0\t0\t5\n",          // decrypting not 0/1
		"cairn-kms-usage 1\na/b\t-1\t1\t1\t0\t0\t5\n",         // negative key id
		"cairn-kms-usage 1\na/b\t4294967296\t1\t1\t0\t0\t5\n", // key id over 32 bits
		"cairn-kms-usage 1\na/b\t1\t1\tx\t0\t0\t5\n",
	} {
		if got, err := decodeUsage([]byte(in)); err == nil {
			t.Errorf("decodeUsage(%q) = %v, nil; want an error", in, got)
		}
	}
}

func FuzzDecodeUsage(f *testing.F) {
	f.Add([]byte(usageHeader + "payments/ledger\t1\t1\t3600000000000\t2\t3\t1700000000000000000\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		records, err := decodeUsage(data)
		if err != nil {
			return
		}
		// What decodes re-encodes to what decodes the same.
		again, err := decodeUsage(encodeUsage(records))
		if err != nil || !cmp.Equal(records, again) {
			t.Errorf("re-decoding %q gave %v, %v", strings.TrimSpace(string(encodeUsage(records))), again, err)
		}
	})
}
