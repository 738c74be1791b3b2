package cli

import (
	"slices"
	"testing"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

func TestRolloutOrder(t *testing.T) {
	for _, tt := range []struct {
		order, built, want []string
	}{
		{nil, []string{"us-east", "eu-west"}, []string{"eu-west", "us-east"}},
		{[]string{"us-east", "eu-west"}, []string{"eu-west", "us-east"}, []string{"us-east", "eu-west"}},
		// The canary region of the order was not built this run: the next
		// one leads.
		{[]string{"us-east", "eu-west", "ap-south"}, []string{"ap-south", "eu-west"}, []string{"eu-west", "ap-south"}},
		// Built regions the order leaves out follow it, sorted.
		{[]string{"eu-west"}, []string{"us-east", "eu-west", "ap-south"}, []string{"eu-west", "ap-south", "us-east"}},
	} {
		if got := rolloutOrder(tt.order, tt.built); !slices.Equal(got, tt.want) {
			t.Errorf("rolloutOrder(%v, %v) = %v, want %v", tt.order, tt.built, got, tt.want)
		}
	}
}

func TestBehindRecord(t *testing.T) {
	const (
		primary = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
		enabled = cryptov1.KeyStatus_KEY_STATUS_ENABLED
		off     = cryptov1.KeyStatus_KEY_STATUS_DISABLED
	)
	type ver struct {
		id uint32
		st cryptov1.KeyStatus
	}
	record := func(name string, regions map[string]uint32, vs ...ver) *statev1.KeysetRecord {
		rec := &statev1.KeysetRecord{Name: name}
		for region, p := range regions {
			c := &cryptov1.EncryptedKeyset{Name: name, Region: region, PrimaryKeyId: p}
			for _, v := range vs {
				c.Versions = append(c.Versions, &cryptov1.KeyVersionInfo{KeyId: v.id, Status: v.st})
			}
			rec.Copies = append(rec.Copies, c)
		}
		return rec
	}
	served := func(name string, p uint32, vs ...ver) *kmsv1.KeysetUsage {
		k := &kmsv1.KeysetUsage{Keyset: name, PrimaryKeyId: p}
		for _, v := range vs {
			k.Versions = append(k.Versions, &kmsv1.KeyVersionUsage{KeyId: v.id, Status: v.st})
		}
		return k
	}
	records := []*statev1.KeysetRecord{
		record("a", map[string]uint32{"us-east": 2, "eu-west": 2}, ver{1, enabled}, ver{2, primary}, ver{3, off}),
		record("b", map[string]uint32{"eu-west": 7}, ver{7, primary}),
	}
	for _, tt := range []struct {
		name   string
		region string
		serves []*kmsv1.KeysetUsage
		want   string
	}{
		{"as recorded (a disabled version left out)", "us-east", []*kmsv1.KeysetUsage{served("a", 2, ver{1, enabled}, ver{2, primary})}, ""},
		{"as recorded, disabled version served disabled", "us-east", []*kmsv1.KeysetUsage{served("a", 2, ver{1, enabled}, ver{2, primary}, ver{3, off})}, ""},
		{"another primary", "us-east", []*kmsv1.KeysetUsage{served("a", 1, ver{1, primary}, ver{2, enabled})}, "a"},
		{"a version the record disabled still decrypts", "us-east", []*kmsv1.KeysetUsage{served("a", 2, ver{1, enabled}, ver{2, primary}, ver{3, enabled})}, "a"},
		{"a version missing", "us-east", []*kmsv1.KeysetUsage{served("a", 2, ver{2, primary})}, "a"},
		{"the keyset not served", "eu-west", []*kmsv1.KeysetUsage{served("a", 2, ver{1, enabled}, ver{2, primary})}, "b"},
		{"keysets of other regions and unknown ones are not its business", "us-east",
			[]*kmsv1.KeysetUsage{served("a", 2, ver{1, enabled}, ver{2, primary}), served("zzz", 9, ver{9, primary})}, ""},
	} {
		if got := behindRecord(records, tt.region, &kmsv1.GetStatusResponse{Keysets: tt.serves}); got != tt.want {
			t.Errorf("%s: behindRecord = %q, want %q", tt.name, got, tt.want)
		}
	}
}
