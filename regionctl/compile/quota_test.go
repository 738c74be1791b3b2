package compile_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
)

func TestCompileQuotas(t *testing.T) {
	quotas := []*bundlev1.Quota{
		{Pattern: "client/us-east/batch", MaxConcurrent: 4},
		{Pattern: "client/*/*", RequestsPerSecond: 500, Burst: 1000, MaxConcurrent: 32},
	}
	def := &bundlev1.Quota{RequestsPerSecond: 100, MaxConcurrent: 8}
	tests := []struct {
		name    string
		quotas  []*bundlev1.Quota
		def     *bundlev1.Quota
		wantErr string
	}{
		{"none", nil, nil, ""},
		{"quotas and a default", quotas, def, ""},
		{"bad pattern", []*bundlev1.Quota{{Pattern: "client/us-east", RequestsPerSecond: 1}}, nil, "quota 0"},
		{"default with a pattern", nil, &bundlev1.Quota{Pattern: "client/*/*"}, "default_quota"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Window: time.Minute,
				Quotas: tt.quotas, DefaultQuota: tt.def})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Compile(%s) = %v, want an error containing %q", tt.name, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Compile(%s) = %v", tt.name, err)
			}
			if diff := cmp.Diff(tt.quotas, res.Bundle.GetQuotas(), protocmp.Transform()); diff != "" {
				t.Errorf("Compile(%s).quotas (-want +got):\n%s", tt.name, diff)
			}
			if diff := cmp.Diff(tt.def, res.Bundle.GetDefaultQuota(), protocmp.Transform()); diff != "" {
				t.Errorf("Compile(%s).default_quota (-want +got):\n%s", tt.name, diff)
			}
		})
	}
}
