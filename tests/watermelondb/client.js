// The Hikma app's sync engine, WatermelonDB's synchronize(), run against a node.
// Usage: node client.js BASE_URL EMAIL PASSWORD
const { Database, Model, appSchema, tableSchema } = require('@nozbe/watermelondb')
const LokiJSAdapter = require('@nozbe/watermelondb/adapters/lokijs').default
const { synchronize } = require('@nozbe/watermelondb/sync')

const { setGenerator } = require('@nozbe/watermelondb/utils/common/randomId')

// The Hikma app gives new records UUIDv7 ids (WatermelonDB's own are 16 random letters).
setGenerator(() => {
  const bytes = require('crypto').randomBytes(16)
  const ms = BigInt(Date.now())
  for (let i = 0; i < 6; i++) bytes[i] = Number((ms >> BigInt(8 * (5 - i))) & 0xffn)
  bytes[6] = (bytes[6] & 0x0f) | 0x70
  bytes[8] = (bytes[8] & 0x3f) | 0x80
  const hex = bytes.toString('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
})

const [firstBase, email, password] = process.argv.slice(2)
// The server the app syncs with; a `server` step points it at another node.
let base = firstBase
const auth = 'Basic ' + Buffer.from(`${email}:${password}`).toString('base64')

class Patient extends Model {
  static table = 'patients'
}

const schema = appSchema({
  version: 1,
  tables: [
    tableSchema({
      name: 'patients',
      columns: [
        { name: 'given_name', type: 'string' },
        { name: 'surname', type: 'string' },
        { name: 'phone', type: 'string' },
        { name: 'date_of_birth', type: 'string' },
        { name: 'metadata', type: 'string' },
        { name: 'created_at', type: 'number' },
        { name: 'updated_at', type: 'number' },
      ],
    }),
  ],
})

const adapter = new LokiJSAdapter({
  schema,
  useWebWorker: false,
  useIncrementalIndexedDB: false,
  extraLokiOptions: { autosave: false },
})
const database = new Database({ adapter, modelClasses: [Patient] })
const patients = database.get('patients')

async function sync() {
  await synchronize({
    database,
    pullChanges: async ({ lastPulledAt }) => {
      const response = await fetch(`${base}/api/v2/sync?last_pulled_at=${lastPulledAt ?? 'null'}&schema_version=1&migration=null`, {
        headers: { Authorization: auth },
      })
      if (!response.ok) throw new Error(`pull: ${response.status} ${await response.text()}`)
      const { changes, timestamp } = await response.json()
      return { changes, timestamp }
    },
    pushChanges: async ({ changes, lastPulledAt }) => {
      const response = await fetch(`${base}/api/v2/sync?last_pulled_at=${lastPulledAt}`, {
        method: 'POST',
        headers: { Authorization: auth, 'Content-Type': 'application/json' },
        body: JSON.stringify(changes),
      })
      if (!response.ok) throw new Error(`push: ${response.status} ${await response.text()}`)
    },
    sendCreatedAsUpdated: false,
  })
}

async function step(s) {
  switch (s.op) {
    case 'sync':
      await sync()
      return { ok: true }
    case 'server':
      base = s.base
      return { ok: true }
    case 'list': {
      const all = await patients.query().fetch()
      return { patients: all.map((p) => p._raw) }
    }
    case 'update':
      await database.write(async () => {
        const p = await patients.find(s.id)
        await p.update((r) => {
          for (const [k, v] of Object.entries(s.fields)) r._setRaw(k, v)
        })
      })
      return { ok: true }
    case 'create': {
      let id
      await database.write(async () => {
        const p = await patients.create((r) => {
          for (const [k, v] of Object.entries(s.fields)) r._setRaw(k, v)
        })
        id = p.id
      })
      return { id }
    }
    case 'delete':
      await database.write(async () => {
        const p = await patients.find(s.id)
        await p.markAsDeleted()
      })
      return { ok: true }
    default:
      throw new Error(`unknown step ${s.op}`)
  }
}

// One JSON step per line on standard input, one JSON answer per line on standard output
// (the database lives as long as the process, like the app's).
async function main() {
  const lines = require('readline').createInterface({ input: process.stdin })
  for await (const line of lines) {
    if (!line.trim()) continue
    let answer
    try {
      answer = await step(JSON.parse(line))
    } catch (e) {
      answer = { error: e && e.stack ? e.stack : String(e) }
    }
    process.stdout.write(JSON.stringify(answer) + '\n')
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e))
  process.exit(1)
})
