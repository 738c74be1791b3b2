package kms_test

import (
	"crypto/ed25519"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms"
)

func TestConfigValidate(t *testing.T) {
	e := newEnv(t)
	alog := audit.NewWriter(io.Discard, audit.Options{})
	good := func() kms.Config {
		return kms.Config{Region: region, StateDir: t.TempDir(), Source: e.pki.Source(kms1ID), RegionKeys: e.keys,
			SigningKeys: []ed25519.PublicKey{e.signer.Public}, Audit: alog}
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("Validate(good) = %v", err)
	}
	tests := []struct {
		name   string
		change func(*kms.Config)
		want   string
	}{
		{"no region", func(c *kms.Config) { c.Region = "" }, "kms: region"},
		{"bad region", func(c *kms.Config) { c.Region = "US East" }, "kms: region"},
		{"no state dir", func(c *kms.Config) { c.StateDir = "" }, "no state directory"},
		{"no source", func(c *kms.Config) { c.Source = nil }, "no identity source"},
		{"identity of another region", func(c *kms.Config) { c.Region = "eu-west" }, "is not a KMS of region \"eu-west\""},
		{"identity of another tier", func(c *kms.Config) { c.Source = e.pki.Source(appID) }, "is not a KMS of region"},
		{"no region keys", func(c *kms.Config) { c.RegionKeys = nil }, "no region key source"},
		{"no signing keys", func(c *kms.Config) { c.SigningKeys = nil }, "no pinned bundle-signing keys"},
		{"short signing key", func(c *kms.Config) { c.SigningKeys = []ed25519.PublicKey{make([]byte, 31)} }, "signing key 0 is 31 bytes"},
		{"no audit", func(c *kms.Config) { c.Audit = nil }, "no audit log"},
		{"negative batch", func(c *kms.Config) { c.MaxBatch = -1 }, "negative MaxBatch"},
		{"negative retry", func(c *kms.Config) { c.RetryMax = -1 }, "negative RetryMax"},
		{"negative in-flight cap", func(c *kms.Config) { c.MaxInFlight = -1 }, "negative MaxInFlight"},
		{"negative data message size", func(c *kms.Config) { c.MaxDataMsgSize = -1 }, "negative MaxDataMsgSize"},
		{"negative call cap", func(c *kms.Config) { c.MaxCallDuration = -1 }, "negative MaxCallDuration"},
		{"data messages over every message", func(c *kms.Config) { c.MaxRecvMsgSize, c.MaxDataMsgSize = 1<<20, 2<<20 }, "MaxDataMsgSize 2097152 is more than MaxRecvMsgSize 1048576"},
		{"negative audit window", func(c *kms.Config) { c.QuotaAuditWindow = -1 }, "negative QuotaAuditWindow"},
		{"default quota burst without a rate", func(c *kms.Config) { c.DefaultQuota = &kms.Quota{Burst: 5} }, "DefaultQuota: burst 5 without requests_per_second"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good()
			tt.change(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Validate(%s) = %v, want error containing %q", tt.name, err, tt.want)
			}
			if _, err := kms.New(c); err == nil {
				t.Errorf("New(%s) = nil error", tt.name)
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	e := newEnv(t)
	alog := audit.NewWriter(io.Discard, audit.Options{})
	cfg := kms.Config{Region: region, StateDir: t.TempDir(), Source: e.pki.Source(kms1ID), RegionKeys: e.keys,
		SigningKeys: []ed25519.PublicKey{e.signer.Public}, Audit: alog}
	// Closing a server never started is fine.
	s, err := kms.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close before Start = %v", err)
	}
	s, err = kms.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(lis); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(lis); err == nil || !strings.Contains(err.Error(), "already started") {
		t.Errorf("second Start = %v, want already started", err)
	}
	s.Close()
	s.Close() // twice is fine
}
