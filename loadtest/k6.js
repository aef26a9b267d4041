// Load a running Sluice with k6 (https://k6.io):
//   k6 run -e TARGET=127.0.0.1:8081 loadtest/k6.js
// Run from the repository root so that the protos in proto/ are found.
import grpc from 'k6/net/grpc';
import { check } from 'k6';

export const options = {
  scenarios: {
    steady: { executor: 'constant-vus', vus: 64, duration: '30s' },
  },
};

const client = new grpc.Client();
client.load(['proto'], 'envoy/service/ratelimit/v3/rls.proto');

export default function () {
  if (__ITER === 0) {
    client.connect(__ENV.TARGET || '127.0.0.1:8081', { plaintext: true });
  }
  const user = `10.0.${Math.floor(Math.random() * 10000)}.1`;
  const response = client.invoke('envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit', {
    domain: 'envoy',
    descriptors: [{ entries: [{ key: 'remote_address', value: user }] }],
  });
  check(response, {
    'answered': (r) => r && r.status === grpc.StatusOK,
    'decided': (r) => r && ['OK', 'OVER_LIMIT'].includes(r.message.overallCode),
  });
}
