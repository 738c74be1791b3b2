package kms

import (
	"context"
	"errors"
	"fmt"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// RegionKeys fetches a region's master key versions, as AEADs by version
// number.
//
// Fetch is called at boot and when a bundle names a region key version the
// server does not hold yet, never on the request path. It makes one attempt:
// retries and backoff are the caller's. The returned map is the caller's; an
// implementation must not keep or change it afterwards.
type RegionKeys interface {
	Fetch(ctx context.Context, region string) (map[uint32]tink.AEAD, error)
}

// regionKeyInfo is the HPKE info label of UnwrapRegionKey's answer.
const regionKeyInfo = "cairn/rootkms/v1/region-key"

// RootKMSRegionKeys fetches region keys from the root KMS with
// UnwrapRegionKey: the answer is HPKE-sealed to a fresh key of each call,
// bound to the region and this server's SPIFFE ID.
type RootKMSRegionKeys struct {
	client *rootkmsclient.Client
	self   string
}

// NewRootKMSRegionKeys returns a RegionKeys that calls the root KMS replicas
// at addrs (any replica answers; the client tries each) as src's identity.
// Close it when done.
func NewRootKMSRegionKeys(src *identity.Source, addrs []string) *RootKMSRegionKeys {
	return &RootKMSRegionKeys{client: rootkmsclient.New(src, addrs), self: src.ID().String()}
}

// Close closes the connections to the root KMS.
func (r *RootKMSRegionKeys) Close() { r.client.Close() }

// Fetch implements RegionKeys.
func (r *RootKMSRegionKeys) Fetch(ctx context.Context, region string) (map[uint32]tink.AEAD, error) {
	rcpt, err := hpkeseal.NewRecipient()
	if err != nil {
		return nil, err
	}
	defer rcpt.Close()
	var resp *rootkmsv1.UnwrapRegionKeyResponse
	err = r.client.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		resp, err = c.UnwrapRegionKey(ctx, &rootkmsv1.UnwrapRegionKeyRequest{Region: region, Recipient: rcpt.PublicKey()})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kms: UnwrapRegionKey(%s): %w", region, err)
	}
	info, err := hpkeseal.Info(regionKeyInfo, region, r.self)
	if err != nil {
		return nil, err
	}
	plain, err := rcpt.Open(resp.GetSealedKeys(), info)
	if err != nil {
		return nil, fmt.Errorf("kms: UnwrapRegionKey(%s): the sealed answer does not open: %w", region, err)
	}
	defer plain.Wipe()
	b := plain.Data()
	defer clear(b)
	return regionAEADs(region, b)
}

// regionAEADs parses a serialized RegionKeyMaterial for region into AEADs,
// wiping the key bytes it parsed.
func regionAEADs(region string, serialized []byte) (map[uint32]tink.AEAD, error) {
	var m rootkmsv1.RegionKeyMaterial
	err := proto.Unmarshal(serialized, &m)
	defer func() {
		for _, v := range m.GetVersions() {
			clear(v.GetKey())
		}
	}()
	if err != nil {
		return nil, fmt.Errorf("kms: region key material does not decode: %w", err)
	}
	if m.GetRegion() != region {
		return nil, fmt.Errorf("kms: asked for the keys of region %q, got %q", region, m.GetRegion())
	}
	out := make(map[uint32]tink.AEAD, len(m.GetVersions()))
	for _, v := range m.GetVersions() {
		if s := v.GetStatus(); s != cryptov1.KeyStatus_KEY_STATUS_PRIMARY && s != cryptov1.KeyStatus_KEY_STATUS_ENABLED {
			continue
		}
		if _, dup := out[v.GetVersion()]; dup {
			return nil, fmt.Errorf("kms: region %s key version %d appears twice", region, v.GetVersion())
		}
		material := secret.New(v.GetKey())
		a, err := keysets.RegionAEAD(material)
		material.Wipe()
		if err != nil {
			return nil, fmt.Errorf("kms: region %s key version %d: %w", region, v.GetVersion(), err)
		}
		out[v.GetVersion()] = a
	}
	if len(out) == 0 {
		return nil, errors.New("kms: the root KMS returned no usable region key version")
	}
	return out, nil
}
